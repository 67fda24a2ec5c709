# The kNN memory from 1k to 1M entries (issue 15): bench_knn.py's GPT-2-small shape with random weights, memory
# at layer 9, every head searching at every token (causal mode, KV cache); results in docs/knn-scale.md
#   python bench.py config/bench_knn_scale.py            (~15 min on 2 CPU cores)
#   python bench.py config/bench_knn_scale_10m.py        (10M entries, built on disk)
from pathlib import Path

exec((Path(__file__).parent / "bench_knn.py").read_text())
suite = ["knn_scale"]
gen_tokens = 64
knn_scale_sizes = [1000, 10000, 100000, 1000000]
knn_scale_exact_max = 100000
knn_scale_compare_at = 100000
knn_scale_compare = ["faiss-fp16", "faiss-sq8", "faiss-ivf", "faiss-hnsw"]
knn_scale_dtype = "float16"
knn_scale_repeats = 3
bench_json = "bench_knn_scale.json"
