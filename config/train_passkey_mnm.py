# Pass-key retrieval with a metalearned neural memory (memory.MNMBlock) after block 2: every window of a
# row's document is written into the row's fast weights, and the next windows read them. Same model, data
# and stages as config/train_passkey_base.py:
#   python train.py config/train_passkey_mnm.py
#   python train.py config/train_passkey_mnm.py config/train_passkey_stage2.py
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_base.py").read_text())
out_dir = "out-passkey-mnm"
mnm_layer = 2
mnm_heads = 4
mnm_key_size = 32
mnm_hidden = 64
mnm_write = "local"
