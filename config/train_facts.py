# The quickstart: a small character-level GPT on the built-in `facts` corpus (python prepare.py facts).
# About 25 minutes on one idle CPU core (0.5 s per iteration); val loss is measured on people whose
# names never occur in training. Reading facts from the context appears late (in-context recall of
# held-out people: 5% at 1000 iterations, 25% at 2000, 46% at 3000), so a shorter run learns the form only.
# Other seeds get there later: the README's quickstart gives their numbers and the command to train on.
out_dir = "out-facts"
dataset = "facts"
eval_interval = 500
eval_iters = 20
log_interval = 50

block_size = 512  # a document (facts, then questions) is 200-800 characters
batch_size = 8
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 2e-3  # small models take a larger step
max_iters = 3000
lr_decay_iters = 3000
min_lr = 2e-4
warmup_iters = 50
beta2 = 0.99  # few tokens per iteration
