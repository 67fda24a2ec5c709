# Pass-key recall by distance (evaluate.py eval='longrange'): every checkpoint below reads the 300 held-out
# val documents of data/passkey (50 at each distance: 0.5, 1, 2, 4, 8 and 16 windows of 128 characters)
# window after window, as in training, and must give the 5-digit key exactly (greedy). Two untrained arms
# use the memory-less model: the persistent kNN memory holding the document's earlier windows (the
# settings of config/sample_facts_recall.py, not tuned here) and kNN-LM over the document's earlier
# windows. Drop the out_dirs you have not trained (--out_dirs="['out-passkey-base']").
#   python evaluate.py config/eval_passkey.py
eval = "longrange"
eval_dataset = "passkey"
out_dirs = ["out-passkey-base", "out-passkey-knn", "out-passkey-knn-fix", "out-passkey-mnm-fix", "out-passkey-mnm-pool",
            "out-passkey-mnm-shift", "out-passkey-mnm-sparse", "out-passkey-mnm-budget", "out-passkey-mnm-last",
            "out-passkey-mnm-spread", "out-passkey-mnm-tied"]
eval_out = "out-passkey-eval"
batch_size = 50
device = "cpu"
dtype = "float32"

knn = [0, 0, 0, 5]
knn_query = "query"
knn_metric = "ip"
knn_recompute = False
bookkeeping_frac = 0.0
mem_frac = 1000.0
knn_softmax_influence = 2.0
resid_only = False
resid_frac = 0.0

knnlm_lambdas = [0.5]
knnlm_k = 16
knnlm_temperature = 1.0
