# The DNC on copy: random 8-bit patterns of length 1-20, then the same patterns back, against
# an LSTM with the same number of parameters trained on the same batches. About 9 minutes on
# 2 CPU cores (OMP_NUM_THREADS=1 is fastest for these small tensors); --compile=True fuses the
# DNC's step for several times the speed where a C++ compiler is at hand.
task = "copy"
out_dir = "out-dnc-copy"
bits = 8
min_len = 1
max_len = 20

memory_slots = 32  # more than the longest pattern: each vector gets a slot of its own
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
warmup_iters = 0
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-5  # a long, low tail settles the last few wrong bits

eval_interval = 250
eval_iters = 64  # 2,048 fixed evaluation sequences
log_interval = 50
