# facts_long with a metalearned neural memory (memory.MNMBlock) after block 2. Same model, data and stages
# as config/train_facts_long_base.py:
#   python train.py config/train_facts_long_mnm.py
#   python train.py config/train_facts_long_mnm.py config/train_facts_long_stage2.py
from pathlib import Path

exec((Path(__file__).parent / "train_facts_long_base.py").read_text())
out_dir = "out-facts-long-mnm"
mnm_layer = 2
mnm_heads = 4
mnm_key_size = 32
mnm_hidden = 64
mnm_write = "local"
