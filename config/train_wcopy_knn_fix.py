# config/train_wcopy_knn.py with both fixes: gradients through the previous window's entries
# (grad_windows = 1) and the gates starting open (gate_init = 0, sigmoid 0.5).
from pathlib import Path

import memory

exec((Path(__file__).parent / "train_wcopy_knn.py").read_text())
out_dir = "out-wcopy-knn-fix"
memory.MemorizingMemory.grad_windows = 1
memory.MemorizingMemory.gate_init = 0.0
