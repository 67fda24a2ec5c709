# Pass-key retrieval without memory: a small char-level GPT reads each passkey document window after
# window (loader='docs'), 128 characters at a time, and has to give the 5-digit key stated 0.5 to 16
# windows earlier. With no memory, a key in an earlier window is out of reach: this is the floor
# the memories are measured against (evaluate.py eval='longrange', config/eval_passkey.py).
# A curriculum in three stages (one schedule of 8,000 iterations, resumed from stage to stage):
#  0. copy drills (600 iterations): random 5-digit numbers, each written four times, nothing else;
#     copying at a fixed offset is learnt here within a few hundred iterations (on pass-key documents
#     alone, 2,500 iterations taught no copying at all, not even of a key in the question's window);
#  1. pass-key documents that fit in one window (to 5,000): finding the key by its content;
#  2. the full corpus, keys 0.5-16 windows back (to 8,000).
#   python prepare.py passkey
#   python prepare.py passkey --option drill=6 --option repeats=4 --option n_train=20000 --out_dir data/passkey_drill4
#   python prepare.py passkey --option "windows=(0.45,0.75)" --option fit=True --option n_train=20000 --out_dir data/passkey_fit
#   python train.py config/train_passkey_base.py
#   python train.py config/train_passkey_base.py config/train_passkey_stage1.py
#   python train.py config/train_passkey_base.py config/train_passkey_stage2.py
# (the same three commands for each of config/train_passkey_{knn,knn_fix,mnm}.py)
out_dir = "out-passkey-base"
dataset = "passkey_drill4"
loader = "docs"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 8
dropout = 0.0
learning_rate = 2e-3
min_lr = 2e-4
max_iters = 600  # stage 0; config/train_passkey_stage1.py and _stage2.py continue the schedule to 8,000
lr_decay_iters = 8000
warmup_iters = 100
beta2 = 0.99
eval_interval = 500
eval_iters = 20
log_interval = 50
device = "cpu"
dtype = "float32"
