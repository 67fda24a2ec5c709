# facts_long with the pass key's MNM recipe (config/train_passkey_mnm_tied.py): the block after the last
# block, shifted and sparse writes, gradients one window back, token values, tied keys, key spread 10.
# The question's "A: " would read under the key that the statement's "... turned " wrote: both follow the
# person and the attribute. Measured negative (docs/RESULTS.md, facts_long): 0% across windows after both
# stages; the writes go to the template's and the names' continuations, not to the values. Stages as
# config/train_facts_long_base.py, stage 1 without the write penalty and the spread (as the pass key's):
#   python train.py config/train_facts_long_mnm_tied.py --mnm_write_penalty=0 --mnm_key_spread=0   # to 4,000
#   python train.py config/train_facts_long_mnm_tied.py config/train_facts_long_stage2.py          # to 8,000
from pathlib import Path

exec((Path(__file__).parent / "train_facts_long_mnm.py").read_text())
out_dir = "out-facts-long-mnm-tied"
mnm_layer = 3
mnm_grad_windows = 1
mnm_shift = True
mnm_write_penalty = 0.1
mnm_write_budget = 5.0
mnm_value = "token"
mnm_tie_keys = True
mnm_key_spread = 10.0
