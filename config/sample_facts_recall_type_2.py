# The reference's Type 2 recall settings on the quickstart model, on top of the recall config:
#   python sample.py config/sample_facts_recall.py config/sample_facts_recall_type_2.py
eval_out = "out-facts/eval_recall_type_2"
knn = [0, 0, 5, 0]
knn_query = "key"
knn_metric = "l2"
knn_recompute = True
bookkeeping_frac = 0.9
mem_frac = 0.0
knn_softmax_influence = 1000.0
resid_only = True
resid_frac = 0.1
