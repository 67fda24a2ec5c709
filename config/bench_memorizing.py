# Speed of the Memorizing Transformer layer and of kNN-LM scoring (suite 'memorizing'):
#   OMP_NUM_THREADS=1 python bench.py config/bench_memorizing.py
# The shape is train.py's default model (6 layers, 384 wide): the cost of a memory search per token
# grows with memory size x width, the model's with width^2 x layers, so tiny models pay the most.
suite = ["memorizing"]
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
batch_size = 4
vocab_size = 65
knn_layer = 4
knn_topk = 32
knn_memory_size = 16384
knnlm_size = 100000
bench_iters = 3
device = "cpu"
dtype = "float32"
bench_json = "bench_memorizing.json"
