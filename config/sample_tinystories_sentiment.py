# Sentiment direction on the small TinyStories model (config/train_tinystories_char.py): a memory of a
# happy text vs no memory, same seeds, VADER compound score of each continuation. Type 3 settings.
out_dir = "out-tinystories-char"
eval = "sentiment"
start = "\nthe dog was angry and mean. he"
memory_text = "FILE:config/memories/happy_story.txt"
eval_seeds = 100
max_new_tokens = 200
temperature = 0.8
top_k = 20
eval_out = "out-tinystories-char/eval_sentiment"

knn = [0, 0, 5, 5]
bookkeeping_frac = 0.9
mem_frac = 5.0
knn_softmax_influence = 0.01
resid_only = False
resid_frac = 0.33
