# config/train_passkey_mnm_shift.py with sparse writes (mnm_write_penalty): an L1 cost on the strength each
# window spends, so a window of filler can leave the fast weights as they are. Without it every window spent
# its full step (strengths summing to the cap of 1 in every head, docs/RESULTS.md) and wrote the key over
# with filler within a window or two. 0.1 x the write loss weight (0.1) = 0.01 per unit of strength: 0.6 of
# loss for a window writing every token at 0.5. Same data and stages as the other passkey recipes.
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_mnm_shift.py").read_text())
out_dir = "out-passkey-mnm-sparse"
mnm_write_penalty = 0.1
