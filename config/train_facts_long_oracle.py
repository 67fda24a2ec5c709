# The oracle for facts_long: the same model with a context of 1,024 characters, trained on the stage-1
# documents (gaps of at most 2 windows of 256), which it reads whole, so it needs no memory. Its recall at
# gaps 0-2 is the in-window recall the memories are measured against; longer documents exceed its
# context. 5,000 iterations of 1 x 1,024 characters (the other recipes' tokens per iteration):
#   python train.py config/train_facts_long_oracle.py
from pathlib import Path

exec((Path(__file__).parent / "train_facts_long_base.py").read_text())
out_dir = "out-facts-long-oracle"
block_size = 1024
batch_size = 1
max_iters = 5000
