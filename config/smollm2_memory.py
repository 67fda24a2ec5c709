# The kNN memory settings for SmolLM2-135M-Instruct (30 layers), shared by config/sample_smollm2_sentiment.py,
# config/sample_smollm2_recall.py and the quickstart; chosen on the tune prompts and items only
# (docs/RESULTS.md#smollm2-135m).
#
# "Sink read": the memory is read where heads park their attention, at position 0 (the attention sink; every
# prompt starts with the bookkeeping token "\n", as the memory's windows do). At layers 15-24, every query head
# searches its key/value head's store with its own query (unrotated: memory keys are scored at relative
# distance 0), takes the 32 nearest entries by inner product and reads their values weighted like attention
# (TS 1), in place of position 0's value (Type 2's resid_only, r 0): what the head gave to the sink, it now
# gives to the memory. Layers 15-24 carry sentiment in this model (a band sweep; earlier bands only disturb
# the text). Every query row decides for itself (causal mode), so the ordinary KV cache applies.
knn = [0] * 15 + [32] * 10 + [0] * 5
knn_query = "query"
knn_metric = "ip"
bookkeeping_frac = 0.0
mem_frac = 0.0
knn_softmax_influence = 1.0
resid_only = True
resid_frac = 0.0
knn_recompute = False
