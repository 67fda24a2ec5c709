# A third stage for the passkey recipes: resume the stage-2 checkpoint (12,000 iterations) and train
# 3,000 more at the schedule's final learning rate (min_lr), on the full passkey corpus. The memorizing
# layer's loss was still falling at 12,000 (docs/RESULTS.md); about 7 more minutes on 2 CPU cores:
#   python train.py config/train_passkey_knn_fix.py config/train_passkey_stage3.py
init_from = "resume"
dataset = "passkey"
max_iters = 15000
