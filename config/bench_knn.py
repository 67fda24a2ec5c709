# kNN memory benchmarks on a GPT-2-small-shaped model with random weights:
#   python bench.py config/bench_knn.py
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50257
suite = ["knn"]
gen_tokens = 256
prompt_len = 16
knn_layer = 9
knn_sizes = [1000, 10000, 100000, 1000000]
knn_ivf_from = 1000000
knn_context = 640
bench_json = "bench_knn.json"
