# Ask the quickstart model about a person it never saw in training (Cressida is a held-out name).
out_dir = "out-facts"
start = ("Cressida Holt is aged 31. Cressida Holt has a flat in Vienna. Cressida Holt looks after a pony named Kiwi. "
         "Cressida Holt's favourite colour is teal.\nQ: Where does Cressida Holt live?\nA:")
num_samples = 3
max_new_tokens = 40
temperature = 0.8
top_k = 10
