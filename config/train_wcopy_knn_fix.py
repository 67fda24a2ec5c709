# config/train_wcopy_knn.py with both fixes: gradients through the previous window's entries
# (knn_grad_windows = 1) and the gates starting open (knn_gate_init = 0, sigmoid 0.5).
from pathlib import Path

exec((Path(__file__).parent / "train_wcopy_knn.py").read_text())
out_dir = "out-wcopy-knn-fix"
knn_grad_windows = 1
knn_gate_init = 0.0
