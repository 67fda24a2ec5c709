# A small char-level GPT with a Memorizing Transformer layer, trained on Shakespeare's plays read
# document-contiguously (each batch row streams its own play, window after window). Prepare with
#   python prepare.py shakespeare_plays --input ../shared/data/shakespeare/input.txt
# The baseline for the perplexity comparison is the same run with --knn_layer=-1 (same data, steps).
out_dir = "out-plays-knn"
dataset = "shakespeare_plays"
loader = "docs"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 8
dropout = 0.0
knn_layer = 2
knn_topk = 32
knn_memory_size = 4096  # per row and head while training; evaluation tries 1k .. 64k
learning_rate = 2e-3
min_lr = 2e-4
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 100
eval_interval = 500
eval_iters = 20
log_interval = 50
device = "cpu"
dtype = "float32"
