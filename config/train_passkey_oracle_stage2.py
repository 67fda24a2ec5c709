# Stage 2 of config/train_passkey_oracle.py: resume its stage-1 checkpoint (windows of 128) with a context
# of 512 on keys 0.5-2 windows back, to the end of the schedule:
#   python train.py config/train_passkey_oracle.py config/train_passkey_oracle_stage2.py
init_from = "resume"
dataset = "passkey_short"
block_size = 512
batch_size = 2
max_iters = 12000
