# Facts recall across windows, no memory: a small char-level GPT reads facts_long documents (facts about
# 1-2 people, then 1-16 windows of 256 characters of other people's facts and questions, then questions
# about the first people; open-set values, held out) window after window. Two stages, as the passkey
# recipes (rotary positions, the answers weighed up by answer_loss):
#  1. documents that fit in one window, the questions right after the facts (data/facts_long_fit), to
#     4,000: the lookup itself (match the name, then copy the attribute's value). On gaps of 0-2 windows
#     (half of them crossing a window boundary) no lookup was learnt in 3,000 iterations (docs/RESULTS.md);
#  2. the full corpus, gaps of 1-16 windows (a quarter with none), to 8,000.
#   python prepare.py facts_long && python prepare.py facts_long --option near=1.0 --option fit=True --out_dir data/facts_long_fit
#   python train.py config/train_facts_long_base.py
#   python train.py config/train_facts_long_base.py config/train_facts_long_stage2.py
# Evaluate with python evaluate.py config/eval_facts_long.py.
out_dir = "out-facts-long-base"
dataset = "facts_long_fit"
loader = "docs"
answer_loss = 10.0
pos = "rope"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 256
batch_size = 8
dropout = 0.0
learning_rate = 2e-3
min_lr = 2e-4
max_iters = 4000  # stage 1; config/train_facts_long_stage2.py continues the same schedule to 8,000
lr_decay_iters = 8000
warmup_iters = 100
beta2 = 0.99
eval_interval = 500
eval_iters = 20
log_interval = 50
device = "cpu"
dtype = "float32"
