# config/train_facts_long_knn_last.py with a first stage that ends on rivals: after the usual 4,000 iterations
# on documents in one window, 12,000 more on such documents about 2-3 people whose facts are about the same
# topics, so the in-window lookup must tell whose fact it reads. The memory is never read in training (every
# document fits in one window); its keys are the ones the lookup learnt, and the joint mix reads them, each
# entry scored as a key 128 characters back (knn_distance, chosen on a tuning corpus: at 0, where a query
# meets only its own key, the lookup carries over in part), its top 8 (knn_topk, chosen there too). Recall
# across windows grows with the rivals' iterations: read at 128, 41% at 8,000, 59% at 12,000, 66% at 16,000
# (74/65/61/52% at 2/4/8/16 windows) and no more at 20,000 (docs/RESULTS.md, facts_long; read at 0, 24% and
# 44% at 8,000 and 12,000). From rivals at the start the lookup is not learnt at all (1.4% in its window at
# 4,000). Data:
#   python prepare.py facts_long --option near=1.0 --option fit=True --out_dir data/facts_long_fit
#   python prepare.py facts_long --option near=1.0 --option fit=True --option "people=(2,3)" --option rivals=True \
#       --out_dir data/facts_long_fit_rivals
# Stages (each later one stretches the schedule to its end, as measured):
#   python train.py config/train_facts_long_knn_rivals.py                                               # to 4,000
#   python train.py config/train_facts_long_knn_rivals.py --init_from=resume --dataset=facts_long_fit_rivals --max_iters=8000
#   for n in 12000 16000; do
#     python train.py config/train_facts_long_knn_rivals.py --init_from=resume --dataset=facts_long_fit_rivals \
#         --max_iters=$n --lr_decay_iters=$n
#   done
# About 47 minutes on two CPU cores in all (stage 1 17 minutes, the rivals' iterations 140-165 ms each): over
# the 30-minute budget; 8,000 (27 minutes) is within it, at 41% across windows.
from pathlib import Path

exec((Path(__file__).parent / "train_facts_long_knn_last.py").read_text())
out_dir = "out-facts-long-knn-rivals"
knn_distance = 128
knn_topk = 8
