# Type 2 (resid_only, r > 0): the reference's recall setting, layer 9 only. Three arms on the same
# seeds: the question alone, the text in the context, the text in the memory.
# Offline: --init_from=path/to/save_pretrained_folder.
init_from = "gpt2"
eval = "recall"
eval_file = "config/memories/recall_gpt2.jsonl"
eval_seeds = 100
max_new_tokens = 20  # a hit: an accepted answer among the first 20 generated tokens
temperature = 0.8
top_k = 200
out_dir = "out-gpt2-memory"
eval_out = "out-gpt2-memory/type_2"

knn = [0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0]  # layer 9
bookkeeping_frac = 0.9
mem_frac = 0.0
knn_softmax_influence = 1000.0
resid_only = True
resid_frac = 0.1
