# Stage 3 of the passkey recipes with the window and the memory in one softmax (knn_mix = 'joint'): resume a
# memorizing layer trained with the paper's gate (stages 1-2 of config/train_passkey_knn_fix.py) and train
# 3,000 more iterations at min_lr. A resume takes knn_mix from the run's settings (it changes no weight).
# Trained jointly from the start the layer recalls far less (docs/RESULTS.md): the gate first learns to
# open, the joint softmax then keeps in-window keys from being diluted by the memory.
#   python train.py config/train_passkey_knn_fix.py config/train_passkey_stage3_joint.py
from pathlib import Path

exec((Path(__file__).parent / "train_passkey_stage3.py").read_text())
knn_mix = "joint"
