# config/sample_smollm2_recall.py on the 24 TUNE items, where the memory settings were chosen.
from pathlib import Path

exec((Path(__file__).parent / "sample_smollm2_recall.py").read_text())
eval_file = "config/smollm2/recall_tune.jsonl"
eval_out = "out-smollm2/recall_tune"
