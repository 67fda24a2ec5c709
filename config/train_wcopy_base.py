# The memorizing layer's test in isolation: every document is a random string of 128 digits written three
# times, so each window repeats the one before it; a model predicts a repeated window only from a memory
# of the previous one (its own window holds nothing to copy). 400 iterations of the passkey recipes' model:
#   python prepare.py passkey --option drill=1 --option repeats=3 --option "drill_style='windows'" --option n_train=4000 --option n_val=20 --out_dir data/passkey_wcopy
#   python train.py config/train_wcopy_base.py          # and _knn, _knn_grad, _knn_gate
#   python evaluate.py config/eval_passkey.py --eval_dataset=passkey_wcopy --out_dirs="['out-wcopy-base','out-wcopy-knn','out-wcopy-knn-grad','out-wcopy-knn-gate']" --longrange_arms="['checkpoints']" --eval_out=out-wcopy-eval
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_base.py").read_text())
out_dir = "out-wcopy-base"
dataset = "passkey_wcopy"
max_iters = 400
lr_decay_iters = 400
warmup_iters = 50
eval_interval = 400
