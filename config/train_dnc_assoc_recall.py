# Associative recall (Graves et al., 2014): 2-6 items of three 6-bit vectors, then one of them
# as a query; answer with the item that followed it. The DNC against an LSTM of its size.
task = "assoc_recall"
out_dir = "out-dnc-assoc-recall"
bits = 6
min_len = 2  # items
max_len = 6
item_len = 3

memory_slots = 32
word_size = 16
read_heads = 2
hidden_size = 64
baseline = True

batch_size = 32
optimizer = "adamw"
learning_rate = 1e-3
weight_decay = 0.0
beta2 = 0.99
grad_clip = 10.0
warmup_iters = 0
max_iters = 4000
lr_decay_iters = 4000
min_lr = 1e-4

eval_interval = 250
eval_iters = 32  # 1,024 fixed evaluation sequences
log_interval = 50
