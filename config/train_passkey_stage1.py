# Stage 1 of the passkey recipes (config/train_passkey_*.py): resume the stage-0 checkpoint (copy drills)
# and train on pass-key documents that fit in one window (every key in its question's window), to 2,000:
#   python train.py config/train_passkey_knn.py config/train_passkey_stage1.py
init_from = "resume"
dataset = "passkey_fit"
max_iters = 5000
