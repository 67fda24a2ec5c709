# Permuted MNIST, 20 tasks, with an MLP of two 256-unit ReLU layers; otherwise the protocol of
# config/train_pmnist_linear.py (320 stored examples per task). --n_tasks=10 for the shorter run.
from pathlib import Path

exec((Path(__file__).parent / "train_pmnist_linear.py").read_text())
out_dir = "out-pmnist-mlp"
classifier = "mlp"
learning_rate = 0.1
ewc_lambda = 100.0  # best of 3, 10, 30, 100 on 10 tasks; 300 diverges in task 10 with lr 0.1
