# DNC speed and memory (python bench.py config/bench_dnc.py): forward + backward of a batch of 16
# sequences of 20 steps, W=32, R=4, LSTM 64, for N = 64, 256 and 1024 slots, with dense links,
# sparse links (K=8) and the step-serial reference.
task = "copy"
bits = 8
batch_size = 16
dnc_seq_len = 20
dnc_slots = [64, 256, 1024]
word_size = 32
read_heads = 4
hidden_size = 64
controller = "lstm"
sparse_links = 8
dnc_reference = True
bench_iters = 3
bench_json = "bench_dnc.json"
