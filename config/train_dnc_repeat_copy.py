# Repeat-copy with the DNC reference's settings (deepmind/dnc train.py): 4-bit patterns of
# length 1-2 repeated 1-2 times, memory 16 x 16, 4 read heads, LSTM 64, RMSProp 1e-4
# (epsilon 1e-10), gradient norm clip 50, batch 16, 100k iterations (about an hour here on
# 2 CPU cores; try --max_iters=5000 for a first look, or --compile=True).
task = "repeat_copy"
out_dir = "out-dnc-repeat-copy"
bits = 4
min_len = 1
max_len = 2
min_repeats = 1
max_repeats = 2

memory_slots = 16
word_size = 16
read_heads = 4
hidden_size = 64
baseline = True

batch_size = 16
optimizer = "rmsprop"
learning_rate = 1e-4
grad_clip = 50.0
decay_lr = False
max_iters = 100000

eval_interval = 1000
eval_iters = 32  # 512 fixed evaluation sequences
log_interval = 100
