# Stage 3 of the MNM pass-key recipe after the last block with a cost on similar write keys
# (mnm_key_spread): resume stages 1-2 of config/train_passkey_mnm_last.py and train 3,000 more iterations
# at min_lr, the write keys of a window's strongly written pairs pushed apart. A resume takes
# mnm_key_spread from the run's settings (it changes no weight). docs/RESULTS.md has the comparison with
# the plain stage 3 (config/train_passkey_stage3.py) from the same stage-2 model.
#   python train.py config/train_passkey_mnm_last.py config/train_passkey_stage3_spread.py
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_stage3.py").read_text())
mnm_key_spread = 10.0
