# config/train_wcopy_knn.py with the gates starting open at 0.5 (memory.MemorizingMemory.gate_init = 0)
# instead of sigmoid(-3) = 0.047; the memory stays detached.
from pathlib import Path

import memory

exec((Path(__file__).parent / "train_wcopy_knn.py").read_text())
out_dir = "out-wcopy-knn-gate"
memory.MemorizingMemory.gate_init = 0.0
