# Recall of facts about held-out people (names never seen in training) by the quickstart model
# (python prepare.py facts; python train.py config/train_facts.py). Three arms on the same seeds:
# the question alone, the facts placed in the context before it, the facts held in the kNN memory.
out_dir = "out-facts"
eval = "recall"
eval_file = "data/facts/recall.jsonl"
eval_items = 100
eval_seeds = 5
max_new_tokens = 24
stop = "\n"  # the answer line only: a later "Q:" line must not count as a hit
temperature = 0.8
top_k = 10
eval_out = "out-facts/eval_recall"

knn = [0, 0, 5, 0]
bookkeeping_frac = 0.9
mem_frac = 0.0
knn_softmax_influence = 1000.0
resid_only = True
resid_frac = 0.1
