# config/train_wcopy_knn.py with gradients through the previous window's memory entries
# (knn_grad_windows = 1: their keys and values are recomputed with the current weights).
from pathlib import Path

exec((Path(__file__).parent / "train_wcopy_knn.py").read_text())
out_dir = "out-wcopy-knn-grad"
knn_grad_windows = 1
