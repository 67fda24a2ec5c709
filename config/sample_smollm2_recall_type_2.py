# The reference's Type 2 recall settings (search with the key, a sharp softmax over the neighbours, residual
# r 0.1, bookkeeping gate 0.9) at SmolLM2's layers 15-24, on top of the recall config:
#   python sample.py config/sample_smollm2_recall.py config/sample_smollm2_recall_type_2.py
eval_out = "out-smollm2/recall_test_type_2"
knn = [0] * 15 + [5] * 10 + [0] * 5
knn_query = "key"
knn_metric = "l2"
bookkeeping_frac = 0.9
mem_frac = 0.0
knn_softmax_influence = 1000.0
resid_only = True
resid_frac = 0.1
