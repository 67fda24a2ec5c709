# A small character-level GPT on TinyStories for the offline sentiment evaluation:
#   python prepare.py tinystories --input ../shared/data/tinystories/train_lowercased.txt --tokenizer char --out_dir data/tinystories_char
#   python train.py config/train_tinystories_char.py
# About 4 minutes on 2 idle CPU cores.
out_dir = "out-tinystories-char"
dataset = "tinystories_char"
eval_interval = 250
eval_iters = 20
log_interval = 25

block_size = 256
batch_size = 16
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 2e-3
max_iters = 1200
lr_decay_iters = 1200
min_lr = 2e-4
warmup_iters = 50
beta2 = 0.99
