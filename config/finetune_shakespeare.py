# Fine-tune pretrained GPT-2 on Tiny Shakespeare with GPT-2 tokens
# (python prepare.py shakespeare). init_from may also be a local save_pretrained folder.
out_dir = "out-shakespeare"
dataset = "shakespeare"
init_from = "gpt2"  # or gpt2-medium, gpt2-large, gpt2-xl
eval_interval = 5
eval_iters = 40
log_interval = 1
always_save_checkpoint = False  # only save when val improves

# 1 row * 32 micro-steps * 1024 tokens = 32,768 tokens per iteration; Shakespeare has ~300k
batch_size = 1
block_size = 1024
gradient_accumulation_steps = 32
max_iters = 20

learning_rate = 3e-5  # fine-tune at a small, constant rate
decay_lr = False
