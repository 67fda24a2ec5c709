# config/train_wcopy_knn.py with the gates starting open at 0.5 (knn_gate_init = 0)
# instead of sigmoid(-3) = 0.047; the memory stays detached.
from pathlib import Path

exec((Path(__file__).parent / "train_wcopy_knn.py").read_text())
out_dir = "out-wcopy-knn-gate"
knn_gate_init = 0.0
