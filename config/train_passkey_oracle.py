# The oracle for pass-key retrieval: the same model, its second stage with a context of 512 characters,
# so that documents with keys up to 2 windows (of 128) back, at most ~430 characters, are read whole in
# one window and need no memory. Stage 1 is config/train_passkey_base.py's (keys in one window of 128);
# stage 2 resumes it at 512 (rotary positions: a model without trainable memories may change its context
# on resume) on the 0.5-2 window corpus, 2 x 512 characters per iteration (the other recipes' tokens):
#   python prepare.py passkey --option "windows=(0.5,2)" --out_dir data/passkey_short
#   python train.py config/train_passkey_oracle.py
#   python train.py config/train_passkey_oracle.py config/train_passkey_oracle_stage2.py
# In config/eval_passkey.py its rows at 0.5-2 windows are the in-context reference; longer documents
# exceed its context (it reads them in windows of 512 like any model, so those rows are no oracle).
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_base.py").read_text())
out_dir = "out-passkey-oracle"
