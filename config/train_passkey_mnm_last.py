# config/train_passkey_mnm_budget.py with the MNM block after the last block (mnm_layer = 3) instead of the
# third: after block 2 the write keys of a pass key's later digits were one vector (cosine 0.97-1.00), so
# the fast weights held one of the five associations; after the last block (what kNN-LM reads) they are
# further apart (0.4-0.6) and every digit is written and read back above chance (docs/RESULTS.md).
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_mnm_budget.py").read_text())
out_dir = "out-passkey-mnm-last"
mnm_layer = 3
