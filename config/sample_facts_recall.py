# Recall of facts about held-out people (names never seen in training) by the quickstart model
# (python prepare.py facts; python train.py config/train_facts.py). Three arms on the same seeds:
# the question alone, the facts placed in the context before it, the facts held in the kNN memory.
out_dir = "out-facts"
eval = "recall"
eval_file = "data/facts/recall.jsonl"  # reported items; the memory settings below were chosen on recall_tune.jsonl
eval_items = 100
eval_seeds = 5
max_new_tokens = 24
stop = "\n"  # the answer line only: a later "Q:" line must not count as a hit
temperature = 0.8
top_k = 10
eval_out = "out-facts/eval_recall"

# The question-dependent variant at the last layer, where this model's lookup heads are (they attend
# from the answer position to the answer in the facts): every position's value becomes a mix of itself
# and the 5 memory entries whose keys best match the newest token's query, weighted like attention.
# No head of this model attends to position 0, so the reference's bookkeeping gate must stay open.
knn = [0, 0, 0, 5]
knn_query = "query"
knn_metric = "ip"
knn_recompute = False  # causal: the ordinary KV cache applies
bookkeeping_frac = 0.0
mem_frac = 1000.0  # every position the row attends to at all
knn_softmax_influence = 2.0
resid_only = False  # Type 1: the position's own value is a candidate of the mix
resid_frac = 0.0
