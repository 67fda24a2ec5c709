# config/train_passkey_mnm_fix.py with shifted writes (mnm_shift): each token's write key is paired with
# the next token's value and strength, so the fast weights map a context to what followed it, the
# association a causal LM reads back ("... the pass key is " -> the key's first digit), as kNN-LM's
# datastore does. Without it a token writes (its key, its own value), and the answer has to be rebuilt
# from what the key's tokens were. Same data and stages as the other passkey recipes.
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_mnm_fix.py").read_text())
out_dir = "out-passkey-mnm-shift"
mnm_shift = True
