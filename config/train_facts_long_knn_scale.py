# config/train_facts_long_knn_last.py with a learned factor per head on the memory's scores
# (knn_learn_scale): a head may sharpen its choice among the retrieved entries (the same-template facts of
# other people crowd the right one more, the more windows the memory holds) without sharpening its local
# attention. Same data and stages:
#   python train.py config/train_facts_long_knn_scale.py                                                # to 4,000
#   python train.py config/train_facts_long_knn_scale.py config/train_facts_long_stage2.py --dataset=facts_long_short
from pathlib import Path

exec((Path(__file__).parent / "train_facts_long_knn_last.py").read_text())
out_dir = "out-facts-long-knn-scale"
knn_learn_scale = True
