# Type 3 (mix over {current + k memories}, then r of the current value): the reference's sentiment
# setting, layers 6-8; otherwise the Type 1 run of config/sample_gpt2_type_1_method.py.
# Offline: --init_from=path/to/save_pretrained_folder.
from pathlib import Path

exec((Path(__file__).parent / "sample_gpt2_type_1_method.py").read_text())
eval_out = "out-gpt2-memory/type_3"
resid_frac = 0.33
