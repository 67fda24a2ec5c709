# Permuted MNIST with the replay reference's protocol (Zeta36/random-memory-adaptation): a linear
# softmax classifier, SGD lr 0.5, batch 32, 10,000 steps per task; replay stores the current
# batch every 1,000 steps (320 examples per task) in a 15,000-slot ring buffer and adds 32
# stored examples to every batch. Fine-tuning, EWC and replay run one after another, on the
# same batches. Offline: --data_dir=../shared/data (the MNIST test set, split 8,000/2,000).
task = "pmnist"
out_dir = "out-pmnist-linear"
data_dir = "../shared/data"
n_tasks = 20
classifier = "linear"
methods = ["finetune", "ewc", "replay"]

optimizer = "sgd"
learning_rate = 0.5
decay_lr = False
grad_clip = 0.0
batch_size = 32
max_iters = 10000  # per task

replay_capacity = 15000
replay_every = 1000
replay_store = 32
replay_batch = 32
replay_policy = "ring"
ewc_lambda = 3.0  # best of 1, 3, 10 on 10 tasks; 30 diverges with lr 0.5
ewc_samples = 500
log_interval = 5000
