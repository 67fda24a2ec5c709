# Type 1 (softmax mix over {current value, k memories}) steering GPT-2's sentiment, evaluated
# with VADER against plain GPT-2 on the same seeds. Offline: --init_from=path/to/save_pretrained_folder.
init_from = "gpt2"
eval = "sentiment"
start = "\nCats are horrible"
memory_text = "FILE:config/memories/cats_positive.txt"
eval_seeds = 100
max_new_tokens = 100
temperature = 0.8
top_k = 200
out_dir = "out-gpt2-memory"
eval_out = "out-gpt2-memory/type_1"

knn = [0, 0, 0, 0, 0, 0, 5, 5, 5, 0, 0, 0]  # layers 6, 7, 8
bookkeeping_frac = 0.9
mem_frac = 5.0
knn_softmax_influence = 0.01
resid_only = False
resid_frac = 0.0
