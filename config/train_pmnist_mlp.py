# Permuted MNIST, 20 tasks, with an MLP of two 256-unit ReLU layers; otherwise the protocol of
# config/train_pmnist_linear.py (320 stored examples per task). --n_tasks=10 for the shorter run.
task = "pmnist"
out_dir = "out-pmnist-mlp"
data_dir = "../shared/data"
n_tasks = 20
classifier = "mlp"
methods = ["finetune", "ewc", "replay"]

optimizer = "sgd"
learning_rate = 0.1
decay_lr = False
grad_clip = 0.0
batch_size = 32
max_iters = 10000  # per task

replay_capacity = 15000
replay_every = 1000
replay_store = 32
replay_batch = 32
replay_policy = "ring"
ewc_lambda = 100.0  # best of 3, 10, 30, 100 on 10 tasks; 300 diverges in task 10 with lr 0.1
ewc_samples = 500
log_interval = 5000
