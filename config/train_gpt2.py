# GPT-2 small (124M) on OpenWebText, as in nanoGPT: launch on one node of 8 GPUs with
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# 12 rows * 1024 tokens * 40 micro-steps = ~0.5M tokens per iteration; 600k iterations = 300B tokens.
out_dir = "out-gpt2"
dataset = "openwebtext"
wandb_log = False  # --wandb_log=True to follow the run on wandb
wandb_project = "mnemo"
wandb_run_name = "gpt2-124M"

batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8  # divided among the processes

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 1e-1
eval_interval = 1000
eval_iters = 200
log_interval = 10
compile = True
