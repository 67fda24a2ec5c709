# config/train_passkey_mnm.py with the task loss through the previous window's write (mnm_grad_windows = 1):
# the previous window is written again with the current weights, so a window's loss also trains what the
# window before it stored (the write keys, values and strengths); by default those learn from the write
# loss alone, which rewards storing every token, not the one that will be asked. Same data and stages.
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_mnm.py").read_text())
out_dir = "out-passkey-mnm-fix"
mnm_grad_windows = 1
