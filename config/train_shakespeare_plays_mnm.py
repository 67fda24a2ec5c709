# The Shakespeare plays run's model and settings with a metalearned neural memory (memory.MNMBlock)
# after block 2 in place of the Memorizing Transformer layer: each batch row streams its own play,
# window after window, writing every window into its row's fast weights; a row's memory starts
# afresh with each play. Prepare with
#   python prepare.py shakespeare_plays --input ../shared/data/shakespeare/input.txt
# The baseline is the same run with --mnm_layer=-1 (same data, steps).
from pathlib import Path

exec((Path(__file__).parent / "train_shakespeare_plays_knn.py").read_text())
out_dir = "out-plays-mnm"
knn_layer = -1
mnm_layer = 2
mnm_heads = 4
mnm_key_size = 32
mnm_hidden = 64
mnm_write = "local"
