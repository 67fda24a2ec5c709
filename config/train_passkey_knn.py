# Pass-key retrieval with a Memorizing Transformer layer (Wu et al. 2022) at layer 2, trained as the paper
# does (a detached memory): each batch row keeps the keys and values of its document's earlier windows
# (4,096 per head: a whole 16-window document) and every head of the layer also attends to its top 32
# entries. Same model, data and stages as config/train_passkey_base.py (its comments give the commands);
# config/train_passkey_knn_fix.py adds the training fixes.
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_base.py").read_text())
out_dir = "out-passkey-knn"
knn_layer = 2
knn_topk = 32
knn_memory_size = 4096
