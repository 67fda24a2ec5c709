# A ~30M-parameter GPT on TinyStories with GPT-2 tokens (python prepare.py tinystories).
# Sized for one GPU; scale gradient_accumulation_steps with torchrun's process count.
out_dir = "out-tinystories"
dataset = "tinystories"
eval_interval = 500
eval_iters = 100
log_interval = 10

block_size = 512
batch_size = 32
gradient_accumulation_steps = 4

n_layer = 8
n_head = 8
n_embd = 512
dropout = 0.0

learning_rate = 6e-4
max_iters = 20000
lr_decay_iters = 20000
min_lr = 6e-5
warmup_iters = 500
compile = True
