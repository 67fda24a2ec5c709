# The Shakespeare plays run's model and settings, on WikiText-2 articles read document-contiguously
# (each batch row streams its own article, window after window), 1,000 iterations. Prepare with
#   python prepare.py wikitext2_docs --input ../shared/data/wikitext2
# The baseline for the perplexity comparison is the same run with --knn_layer=-1 (same data, steps).
from pathlib import Path

exec((Path(__file__).parent / "train_shakespeare_plays_knn.py").read_text())
out_dir = "out-wiki-knn"
dataset = "wikitext2_docs"
max_iters = 1000
lr_decay_iters = 1000
