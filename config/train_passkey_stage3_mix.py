# Stage 3 on data/passkey_mix, whose keys are stated 0.25-16 windows before the question (the full corpus: 0.5-16),
# so more of them sit in the question's own window: resume the stage-2 checkpoint and train 3,000 more at
# min_lr. An MNM model's own lookup fades in stage 2, where nearly every key is in the memory; this stage
# brings it back (docs/RESULTS.md, "MNM: token values and tied keys"):
#   python prepare.py passkey --option "windows=(0.25,16)" --out_dir data/passkey_mix
#   python train.py config/train_passkey_mnm_tied.py config/train_passkey_stage3_mix.py
init_from = "resume"
dataset = "passkey_mix"
max_iters = 15000
