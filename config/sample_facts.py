# Ask the quickstart model about a person it never saw in training.
out_dir = "out-facts"
start = "Zora Lindqvist lives in Kyoto. Zora Lindqvist has a parrot named Pepper.\nQ: Where does Zora Lindqvist live?\nA:"
num_samples = 3
max_new_tokens = 60
temperature = 0.8
top_k = 10
