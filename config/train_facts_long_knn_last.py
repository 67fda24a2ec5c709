# facts_long with the memorizing layer at the last block (layer 3) instead of layer 2, both training fixes
# (config/train_facts_long_knn_fix.py) and knn_mix = 'joint' (the window's keys and the retrieved entries in
# one softmax). At layer 2 a memory key at a value's first character did not yet tell whose value it was
# (the stated value was among a head's top 32 for 16-54% of the answer characters); at layer 3 it is for
# 92-99%, and the layer recalls facts across windows (docs/RESULTS.md, facts_long). Stages (the documents'
# questions 1-2 windows after their facts from stage 2 on: data/facts_long_short, made by
# python prepare.py facts_long --option "windows=(1,2)" --option near=0.5 --out_dir data/facts_long_short):
#   python train.py config/train_facts_long_knn_last.py                                                # to 4,000
#   python train.py config/train_facts_long_knn_last.py config/train_facts_long_stage2.py --dataset=facts_long_short
#   python train.py config/train_facts_long_knn_last.py config/train_facts_long_stage2.py --dataset=facts_long_short \
#       --max_iters=12000 --lr_decay_iters=12000
# Stages 2 and 3 take ~30 minutes each on 2 CPU cores (up to 3 windows in memory): over the CPU budget.
from pathlib import Path

exec((Path(__file__).parent / "train_facts_long_knn_fix.py").read_text())
out_dir = "out-facts-long-knn-last"
knn_layer = 3
knn_mix = "joint"
