# The kNN memory settings for SmolLM2-135M-Instruct (30 layers), shared by config/sample_smollm2_sentiment.py,
# config/sample_smollm2_recall.py and bench.py's suite 'smollm2'; chosen on the tune prompts and items only
# (docs/RESULTS.md#smollm2-135m; why they work: docs/knn-memory.md).
#
# "Sink read": the memory is read where heads park their attention, at position 0 (the attention sink; every
# prompt starts with the bookkeeping token "\n", as the memory's windows do). At layers 15-24, every query head
# searches its key/value head's store with its own query (unrotated: memory keys are scored at relative
# distance 0), takes the 32 nearest entries and reads their values weighted like attention (TS 1), in place
# of position 0's value (resid_only, r 0): what the head gave to the sink, it now gives to the memory. Every
# query row decides for itself (causal mode), so the ordinary KV cache applies.
# The search is by L2 distance: on the tune splits it did as well as inner product (sentiment and recall
# alike), and an IVF index finds L2 neighbours probing 1-2 of its lists, where inner product needed nearly
# all of them (at 100k entries, batch 1: 1.3x against 4.1x the time of memory off; docs/RESULTS.md).
knn = [0] * 15 + [32] * 10 + [0] * 5
knn_query = "query"
knn_metric = "l2"
bookkeeping_frac = 0.0
mem_frac = 0.0
knn_softmax_influence = 1.0
resid_only = True
resid_frac = 0.0
knn_recompute = False
# A memory of many texts (other people's facts beside the asked person's): each row first picks the one text
# its prompt matches best (knn_documents, a vote of the prompt's keys) and reads only that. On the tune items
# with 23 other paragraphs in the memory: 12 of 12 with it, 0 of 12 without, 7 of 12 reading the best 2.
# A memory of one text is read as before.
knn_documents = 1
