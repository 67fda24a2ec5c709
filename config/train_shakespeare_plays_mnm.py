# A small char-level GPT with a metalearned neural memory (memory.MNMBlock) after block 2, trained on
# Shakespeare's plays read document-contiguously: each batch row streams its own play, window after
# window, writing every window into its row's fast weights; a row's memory starts afresh with each play.
# Prepare with
#   python prepare.py shakespeare_plays --input ../shared/data/shakespeare/input.txt
# The baseline is the same run with --mnm_layer=-1 (same data, steps).
out_dir = "out-plays-mnm"
dataset = "shakespeare_plays"
loader = "docs"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 8
dropout = 0.0
mnm_layer = 2
mnm_heads = 4
mnm_key_size = 32
mnm_hidden = 64
mnm_write = "local"
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
