# Recall of facts on the held-out test dialogues, memory on vs off (after train.py config/train_dialogs.py).
out_dir = "out-dialogs"
eval = "dialog"
batch_size = 100  # dialogues side by side
device = "cpu"
