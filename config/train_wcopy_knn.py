# config/train_wcopy_base.py with the memorizing layer of config/train_passkey_knn.py (layer 2, top 32),
# as Wu et al. train it: a detached memory.
from pathlib import Path

exec((Path(__file__).parent / "train_wcopy_base.py").read_text())
out_dir = "out-wcopy-knn"
knn_layer = 2
knn_topk = 32
knn_memory_size = 4096
