# Stage 2 of config/train_facts_long_oracle.py: resume its stage-1 checkpoint (windows of 256) with a
# context of 1,024 on gaps of 1-2 windows, to the end of the schedule:
#   python train.py config/train_facts_long_oracle.py config/train_facts_long_oracle_stage2.py
init_from = "resume"
dataset = "facts_long_short"
block_size = 1024
batch_size = 2
max_iters = 8000
