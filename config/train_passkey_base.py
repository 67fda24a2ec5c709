# Pass-key retrieval without memory: a small char-level GPT (rotary positions) reads each passkey document
# window after window (loader='docs'), 128 characters at a time, and has to give the 5-digit key stated 0.5
# to 16 windows earlier. With no memory, a key in an earlier window is out of reach: this is the floor the
# memories are measured against (evaluate.py eval='longrange', config/eval_passkey.py).
# Two stages of one schedule (12,000 iterations), the second resuming the first:
#  1. documents that fit in one window (every key in its question's window), to 4,000: finding the key
#     by its content. answer_loss weighs the key's digits up; without it nothing was learnt in 5,000
#     iterations (docs/RESULTS.md), with it the lookup appears within ~1,000;
#  2. the full corpus, keys 0.5-16 windows back, to 12,000.
#   python prepare.py passkey
#   python prepare.py passkey --option "windows=(0.45,0.75)" --option fit=True --option n_train=20000 --out_dir data/passkey_fit
#   python train.py config/train_passkey_base.py
#   python train.py config/train_passkey_base.py config/train_passkey_stage2.py
# (the same two commands for each of config/train_passkey_{knn,knn_fix,mnm}.py)
out_dir = "out-passkey-base"
dataset = "passkey_fit"
loader = "docs"
answer_loss = 10.0
n_layer = 4
n_head = 4
n_embd = 128
pos = "rope"  # a lookup by content is learnt ~2x sooner than with learned positions (docs/RESULTS.md)
block_size = 128
batch_size = 8
dropout = 0.0
learning_rate = 2e-3
min_lr = 2e-4
max_iters = 4000  # stage 1; config/train_passkey_stage2.py continues the schedule to 12,000
lr_decay_iters = 12000
warmup_iters = 100
beta2 = 0.99
eval_interval = 500
eval_iters = 20
log_interval = 50
device = "cpu"
dtype = "float32"
