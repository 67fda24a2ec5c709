# config/train_passkey_knn.py with the two training fixes of the memorizing layer: gradients through the
# previous window's memory entries (knn_grad_windows = 1: their keys and values are recomputed with the current
# weights, so retrieval trains the layer's key and value projections) and the gates starting open
# (knn_gate_init = 0: sigmoid 0.5 instead of 0.047). Same data, stages and commands as the other passkey recipes,
# plus a third stage, 3,000 iterations at the final learning rate (29 minutes in all on 2 CPU cores):
#   python train.py config/train_passkey_knn_fix.py config/train_passkey_stage3.py
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_knn.py").read_text())
out_dir = "out-passkey-knn-fix"
knn_grad_windows = 1
knn_gate_init = 0.0
