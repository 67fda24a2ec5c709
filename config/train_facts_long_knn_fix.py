# config/train_facts_long_knn.py with the memorizing layer's two training fixes (as config/train_passkey_knn_fix.py):
# gradients through the previous window's entries (knn_grad_windows = 1) and the gates starting open
# (knn_gate_init = 0). Same data and stages as the other facts_long recipes.
from pathlib import Path

exec((Path(__file__).parent / "train_facts_long_knn.py").read_text())
out_dir = "out-facts-long-knn-fix"
knn_grad_windows = 1
knn_gate_init = 0.0
