# Stage 2 of the passkey recipes (config/train_passkey_*.py): resume the stage-1 checkpoint (keys in the
# question's window) and train on to the end of its schedule on the full passkey corpus (0.5-16 windows):
#   python train.py config/train_passkey_knn.py config/train_passkey_stage2.py
init_from = "resume"
dataset = "passkey"
max_iters = 12000
