# Stage 2 of the facts_long recipes (config/train_facts_long_*.py): resume the stage-1 checkpoint and
# train on to the end of its schedule on the full facts_long corpus (gaps of 1-16 windows):
#   python train.py config/train_facts_long_knn.py config/train_facts_long_stage2.py
init_from = "resume"
dataset = "facts_long"
max_iters = 8000
