# A small character-level GPT on Tiny Shakespeare (python prepare.py shakespeare_char --input ...).
# CPU-friendly as set here; on a GPU try n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64.
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 20
log_interval = 10
always_save_checkpoint = False  # only save when val improves: the model overfits quickly

block_size = 128
batch_size = 16
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.1

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
warmup_iters = 100
beta2 = 0.99
