# The oracle for facts_long: the same model with a context of 1,024 characters, trained on documents with
# gaps of at most 2 windows of 256 (data/facts_long_short; 99.9% of them fit in its context whole), so it
# reads facts and questions together and needs no memory. Its recall at gaps 0-2 is the in-window recall
# the memories are measured against; longer documents exceed its context (it reads them in windows of
# 1,024 like any model, so those rows are no oracle). One stage of 8,000 iterations of 2 x 1,024
# characters (the other recipes' tokens per iteration):
#   python prepare.py facts_long --option "windows=(1,2)" --option near=0.5 --out_dir data/facts_long_short
#   python train.py config/train_facts_long_oracle.py
# Measured: this one stage learnt no lookup (0% at every gap, docs/RESULTS.md); it needs a first stage on
# documents that fit its window, as the other facts_long recipes have.
from pathlib import Path

exec((Path(__file__).parent / "train_facts_long_base.py").read_text())
out_dir = "out-facts-long-oracle"
dataset = "facts_long_short"
block_size = 1024
batch_size = 2
max_iters = 8000
