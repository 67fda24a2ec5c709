# A stage between the passkey recipes' stages 1 and 2 for an MNM block with mnm_grad_windows = 1: resume
# the stage-1 checkpoint (keys in the question's window) and train to 8,000 on data/passkey_near, whose
# keys are stated 0.7-1.4 windows before the question, so about 85% of them sit in the window just
# before it. The block's write path learns from the task loss only one window back (mnm_grad_windows),
# and in the full corpus few keys are there; here nearly every document trains what the key's window
# writes. Then stage 2 (to 12,000) and stage 3 as usual:
#   python prepare.py passkey --option "windows=(0.7,1.4)" --out_dir data/passkey_near
#   python train.py config/train_passkey_mnm_last.py config/train_passkey_stage_near.py
init_from = "resume"
dataset = "passkey_near"
max_iters = 8000
