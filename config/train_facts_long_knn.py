# facts_long with a Memorizing Transformer layer at layer 2 (top 32 of 8,192 entries per row and head: a
# whole 16-window document). Same model, data and stages as config/train_facts_long_base.py:
#   python train.py config/train_facts_long_knn.py
#   python train.py config/train_facts_long_knn.py config/train_facts_long_stage2.py
from pathlib import Path

exec((Path(__file__).parent / "train_facts_long_base.py").read_text())
out_dir = "out-facts-long-knn"
knn_layer = 2
knn_topk = 32
knn_memory_size = 8192
