# facts_long recall by gap (evaluate.py eval='longrange'): 300 held-out val documents of data/facts_long
# (50 at each gap of 0, 1, 2, 4, 8 and 16 windows of 256 characters between the facts and the questions,
# 2-4 questions each, people and values never seen in training); the answer word must come out exactly.
#   python evaluate.py config/eval_facts_long.py
from pathlib import Path

exec((Path(__file__).parent / "eval_passkey.py").read_text())
eval_dataset = "facts_long"
out_dirs = ["out-facts-long-base", "out-facts-long-knn-fix", "out-facts-long-oracle"]
eval_out = "out-facts-long-eval"
batch_size = 25
