# The DNC on copy: random 8-bit patterns of length 1-20, then the same patterns back, against
# an LSTM with the same number of parameters trained on the same batches.
task = "copy"
out_dir = "out-dnc-copy"
bits = 8
min_len = 1
max_len = 20

memory_slots = 32
word_size = 16
read_heads = 1
hidden_size = 64
baseline = True

batch_size = 32
optimizer = "adamw"
learning_rate = 1e-3
weight_decay = 0.0
beta2 = 0.99
grad_clip = 10.0
decay_lr = False
max_iters = 4000

eval_interval = 250
eval_iters = 32  # 1,024 fixed evaluation sequences
log_interval = 50
