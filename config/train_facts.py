# The quickstart: a small character-level GPT on the built-in `facts` corpus (python prepare.py facts).
# A few minutes on 2 CPU cores; val loss is measured on people whose names never occur in training.
out_dir = "out-facts"
dataset = "facts"
eval_interval = 250
eval_iters = 20
log_interval = 25

block_size = 512  # a document (facts, then questions) is 300-600 characters
batch_size = 8
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 2e-3  # small models take a larger step
max_iters = 1500
lr_decay_iters = 1500
min_lr = 2e-4
warmup_iters = 50
beta2 = 0.99  # few tokens per iteration
