# Pass-key retrieval with an MNM block that reads like kNN-LM: config/train_passkey_mnm_last.py (after the last
# block, shifted and sparse writes, gradients one window back) with
#   - token values (mnm_value = 'token'): a pair writes the embedding of the token after its key's, not a learnt
#     projection, which the write loss had made easy to store and unable to name its digit;
#   - tied keys (mnm_tie_keys): a token reads under the key it would write, so the question's "...is 4" asks
#     under the key the statement's "...is 4" wrote;
#   - mnm_key_spread = 10 from stage 2 on, so that the key's five pairs are written under five keys.
# Three stages (docs/RESULTS.md, "MNM: token values and tied keys"); stage 1 without the write penalty and the
# spread (with the penalty the memory learnt to write nothing there, and never recovered):
#   python prepare.py passkey --option "windows=(0.25,16)" --out_dir data/passkey_mix
#   python train.py config/train_passkey_mnm_tied.py --mnm_write_penalty=0 --mnm_key_spread=0   # to 4,000
#   python train.py config/train_passkey_mnm_tied.py config/train_passkey_stage2.py            # to 12,000
#   python train.py config/train_passkey_mnm_tied.py config/train_passkey_stage3_mix.py        # to 15,000
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_mnm_last.py").read_text())
out_dir = "out-passkey-mnm-tied"
mnm_value = "token"
mnm_tie_keys = True
mnm_key_spread = 10.0
