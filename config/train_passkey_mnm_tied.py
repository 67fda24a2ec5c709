# config/train_passkey_mnm_token.py with tied keys (mnm_tie_keys): a token reads under the key it would write,
# as kNN-LM's query and keys are one representation, so the question's "...is 4" asks under the key that the
# statement's "...is 4" wrote, and every read's task loss trains the write keys (docs/RESULTS.md).
#   python train.py config/train_passkey_mnm_tied.py --mnm_write_penalty=0             # stage 1, to 4,000
#   python train.py config/train_passkey_mnm_tied.py config/train_passkey_stage2.py    # stage 2, to 12,000
#   python train.py config/train_passkey_mnm_tied.py config/train_passkey_stage3_spread.py
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_mnm_token.py").read_text())
out_dir = "out-passkey-mnm-tied"
mnm_tie_keys = True
