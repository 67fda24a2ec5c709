# config/train_passkey_mnm_last.py with the write keys of a window pushed apart from the start
# (mnm_key_spread, as config/train_passkey_stage3_spread.py does for stage 3 only): keys that are one
# vector hold one association, and without the cost the keys of a pass key's places drifted together.
# Measured (docs/RESULTS.md): from the start it does not work. The memory learns to write nothing (strength
# 0.02 or less on every digit), so the recall is 0% beyond the window; the cost works as stage 3 instead
# (config/train_passkey_stage3_spread.py).
#   python train.py config/train_passkey_mnm_spread.py
#   python train.py config/train_passkey_mnm_spread.py config/train_passkey_stage2.py
#   python train.py config/train_passkey_mnm_spread.py config/train_passkey_stage3.py
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_mnm_last.py").read_text())
out_dir = "out-passkey-mnm-spread"
mnm_key_spread = 10.0
