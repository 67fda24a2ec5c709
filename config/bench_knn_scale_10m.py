# 10M entries (issue 15): float16 keys and values built on disk (knn_scale_dir) and memory-mapped; auto picks
# IVF-PQ fast-scan (4-bit codes, re-ranked with the stored keys). The whole memory (12 heads: 31 GB of float16
# keys and values, ~3 GB of index) would take over an hour of these 2 CPU cores to generate and index, so the
# memory holds 1 head and every token's 12 searches (one per model head) go to it; per-head costs (index bytes,
# build time) are independent across heads and are scaled by 12 (docs/knn-scale.md).
#   python bench.py config/bench_knn_scale_10m.py
from pathlib import Path

exec((Path(__file__).parent / "bench_knn_scale.py").read_text())
knn_scale_sizes = [10000000]
knn_scale_heads = 1
knn_scale_repeats = 3
bench_json = "bench_knn_scale_10m.json"
