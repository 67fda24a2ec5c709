# 10M entries x 12 heads x 64 dims (30 GB of float32 keys): float16 keys and values built on disk
# (knn_scale_dir, ~31 GB free space needed) and memory-mapped; auto picks IVF-PQ fast-scan (4-bit codes,
# re-ranked with the stored keys). 256 IVF lists: assigning 120M keys to 1024 lists would take ~15 min
# of the 2 CPU cores alone.
#   python bench.py config/bench_knn_scale_10m.py
from pathlib import Path

exec((Path(__file__).parent / "bench_knn_scale.py").read_text())
knn_scale_sizes = [10000000]
knn_scale_nlist = 256
knn_scale_repeats = 2
bench_json = "bench_knn_scale_10m.json"
