# The oracle for facts_long: the same model, its second stage with a context of 1,024 characters on
# documents with gaps of at most 2 windows of 256 (data/facts_long_short; 99.9% of them fit in its context
# whole), so it reads facts and questions together and needs no memory. Its recall at gaps 0-2 is the
# in-window recall the memories are measured against; longer documents exceed its context (it reads them
# in windows of 1,024 like any model, so those rows are no oracle). Stage 1 is the other recipes' (documents
# that fit in one window of 256, to 4,000; one stage straight at 1,024 learnt no lookup, docs/RESULTS.md);
# stage 2 resumes it at 1,024 (rotary positions: a model without trainable memories may change its
# context on resume), 2 x 1,024 characters per iteration, the other recipes' tokens:
#   python prepare.py facts_long --option "windows=(1,2)" --option near=0.5 --out_dir data/facts_long_short
#   python train.py config/train_facts_long_oracle.py
#   python train.py config/train_facts_long_oracle.py config/train_facts_long_oracle_stage2.py
from pathlib import Path

exec((Path(__file__).parent / "train_facts_long_base.py").read_text())
out_dir = "out-facts-long-oracle"
