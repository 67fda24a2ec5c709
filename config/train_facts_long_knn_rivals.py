# config/train_facts_long_knn_last.py with a first stage that ends on rivals: after the usual 4,000 iterations
# on documents in one window, 8,000 more on such documents about 2-3 people whose facts are about the same
# topics, so the in-window lookup must tell whose fact it reads. The memory is never read in training (every
# document fits in one window); its keys are the ones the lookup learnt, and the joint mix reads them. It
# recalls three to four times what the two-stage recipe does across windows (docs/RESULTS.md, facts_long).
# From rivals at the start the lookup is not learnt at all (1.4% in its window at 4,000). Data:
#   python prepare.py facts_long --option near=1.0 --option fit=True --out_dir data/facts_long_fit
#   python prepare.py facts_long --option near=1.0 --option fit=True --option "people=(2,3)" --option rivals=True \
#       --out_dir data/facts_long_fit_rivals
# Stages:
#   python train.py config/train_facts_long_knn_rivals.py                                               # to 4,000
#   python train.py config/train_facts_long_knn_rivals.py --init_from=resume --dataset=facts_long_fit_rivals --max_iters=8000
#   python train.py config/train_facts_long_knn_rivals.py --init_from=resume --dataset=facts_long_fit_rivals \
#       --max_iters=12000 --lr_decay_iters=12000                                                      # 24% -> 44%
# About 35-40 minutes on two CPU cores in all (stage 1 17 minutes, the rivals' iterations 120-165 ms each): over
# the 30-minute budget by the last stage.
from pathlib import Path

exec((Path(__file__).parent / "train_facts_long_knn_last.py").read_text())
out_dir = "out-facts-long-knn-rivals"
