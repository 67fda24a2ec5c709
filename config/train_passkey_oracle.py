# The oracle for pass-key retrieval: the same model with a context of 512 characters, trained on the
# stage-1 documents (keys 0.5-2 windows of 128 back, documents of at most ~430 characters), so every
# document is read whole in one window and no memory is needed. It answers the 0.5-2 window distances
# of the evaluation from its context; longer documents exceed its context (their rows in the table are
# not an oracle). 1,000 iterations of 2 x 512 characters: the tokens per iteration of the other recipes.
#   python train.py config/train_passkey_oracle.py
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_base.py").read_text())
out_dir = "out-passkey-oracle"
block_size = 512
batch_size = 2
max_iters = 1000
lr_decay_iters = 1000
