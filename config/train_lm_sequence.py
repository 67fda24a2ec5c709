# A small GPT trained on one corpus after another, with and without replay; forgetting is the
# rise of the validation loss on the earlier corpora. Prepare the three with GPT-2 tokens:
#   python prepare.py shakespeare --input ../shared/data/shakespeare/input.txt
#   python prepare.py tinystories --input ../shared/data/tinystories/valid_head.txt
#   python prepare.py text --input ../shared/data/wikitext2/valid.txt --out_dir data/wikitext2
task = "lm_sequence"
out_dir = "out-lm-sequence"
datasets = ["shakespeare", "tinystories", "wikitext2"]
methods = ["finetune", "replay"]

n_layer = 2
n_head = 4
n_embd = 64
block_size = 64
batch_size = 8
dropout = 0.0

learning_rate = 2e-3
max_iters = 250  # per corpus; the learning-rate schedule starts again on each
warmup_iters = 20
lr_decay_iters = 250
min_lr = 2e-4
beta2 = 0.99

replay_capacity = 4000
replay_every = 5
replay_store = 4
replay_batch = 8
replay_policy = "reservoir"
eval_iters = 20
log_interval = 100
