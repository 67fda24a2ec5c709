# config/train_passkey_mnm_last.py with token values (mnm_value = 'token'): a pair writes the embedding of
# the token after its key's, as kNN-LM's datastore stores the next token, instead of a learnt projection of
# the block's output. Read back exactly, the learnt values of the recipe above named their digit 3-16% of
# the time (docs/RESULTS.md, "MNM: what the reads carry"), so the memory could hold the key only in a code
# the model half reads. Stage 1 runs without the write penalty: with it, the memory learnt to write nothing
# in stage 1 and still wrote none 3,500 iterations into stage 2.
#   python train.py config/train_passkey_mnm_token.py --mnm_write_penalty=0            # stage 1, to 4,000
#   python train.py config/train_passkey_mnm_token.py config/train_passkey_stage2.py   # stage 2, to 12,000
#   python train.py config/train_passkey_mnm_token.py config/train_passkey_stage3_spread.py
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_mnm_last.py").read_text())
out_dir = "out-passkey-mnm-token"
mnm_value = "token"
