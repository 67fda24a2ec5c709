# Plain GPT-2 sampling (online: downloads the weights; offline: --init_from=path/to/save_pretrained_folder).
init_from = "gpt2"
start = "\nCats are"
num_samples = 5
max_new_tokens = 100
temperature = 0.8
top_k = 200
