# config/train_passkey_mnm_fix.py with one write per window (mnm_pool): each head writes a single pair, its
# window's keys, values and strengths pooled with learned attention weights, so a window can store its
# pass key at full strength instead of spreading one step over its 128 characters. Same data and stages.
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_mnm_fix.py").read_text())
out_dir = "out-passkey-mnm-pool"
mnm_pool = True
