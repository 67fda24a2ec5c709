"""
Train a GPT. One process:

    python train.py config/train_facts.py --max_iters=500

Many processes, one per GPU (or CPU processes with gloo), through DistributedDataParallel:

    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Batches are a pure function of (seed, iteration): the global batch of iteration i is the same
rows whatever the world size, each rank taking its share of the micro-steps. That is what makes
a resumed run equal an uninterrupted one and N processes equal one.
"""

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import ConfigError, format_config, load_config
from memory import (MNM, MNM_SHAPE_KEYS, MNM_WRITES, add_memorizing_layer, add_mnm_block, memorizing_layer,
                    mnm_block)
from model import (GPT, GPTConfig, CheckpointError, Seq2Seq, Seq2SeqConfig, atomic_save, atomic_write,
                   load_checkpoint, model_args, model_from_checkpoint, remap_vocab, new_embedding_rows)
from prepare import DataError, WordVocab, check_meta_compatible, load_doc_starts, load_meta, open_split


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    eval_interval: int = 250
    log_interval: int = 10
    eval_iters: int = 20
    eval_only: bool = False  # evaluate once and exit
    always_save_checkpoint: bool = True  # False: keep only the checkpoint with the best val loss
    init_from: str = "scratch"  # 'scratch', 'resume' (from out_dir), 'gpt2*', or a local HF GPT-2 folder
    # logging
    wandb_log: bool = False
    wandb_project: str = "mnemo"
    wandb_run_name: str = "run"
    # data
    dataset: str = "facts"
    data_dir: str = "data"  # the dataset lives in data_dir/dataset (what prepare.py writes)
    gradient_accumulation_steps: int = 1  # micro-steps per global batch, shared out over the ranks
    loader: str = "random"  # 'random': windows at random offsets; 'docs': every batch row reads its own
    # documents window after window (DocStream), which a memorizing layer needs
    batch_size: int = 12  # rows per micro-step (per rank)
    block_size: int = 256
    # model (ignored when resuming or fine-tuning: the checkpoint's shape wins)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True
    # Memorizing Transformer layer (model.GPTConfig): kNN attention over each batch row's memory of its
    # document's earlier windows at this layer, -1 = none; needs loader='docs'
    knn_layer: int = -1
    knn_topk: int = 32
    knn_memory_size: int = 16384  # entries per batch row and head
    knn_search_dtype: str = "float32"  # 'bfloat16': about 2x faster retrieval on CPUs with AVX512-BF16 (see GPTConfig)
    # metalearned neural memory (memory.MNMBlock) after this layer's block, written window by window with each
    # row's document, -1 = none; needs loader='docs'; shaped by mnm_heads, mnm_key_size, mnm_hidden, mnm_write
    mnm_layer: int = -1
    # AdamW
    learning_rate: float = 6e-4
    max_iters: int = 5000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # learning-rate schedule: linear warm-up, then cosine decay to min_lr
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: max_iters
    min_lr: float = 6e-5
    # system
    device: str = "auto"  # 'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype: str = "auto"  # 'auto' (bfloat16 on GPUs that have it, else float16 on GPU, float32 on CPU), 'float32', 'bfloat16', 'float16'
    compile: bool = False  # torch.compile the model (worth it on GPU for long runs)
    seed: int = 1337
    # what to train: 'lm' (the GPT above), 'dialog' (the seq2seq chatbot, settings at the end), or one of
    # tasks.py's tasks, which use the settings below:
    # 'copy', 'repeat_copy', 'assoc_recall' (a DNC against an LSTM of its size), 'pmnist' and
    # 'lm_sequence' (continual learning: fine-tuning, EWC and replay under one protocol)
    task: str = "lm"
    # DNC (memory.DNCConfig); the 'gpt' controller takes n_head from above and attends over block_size steps
    memory_slots: int = 16  # N
    word_size: int = 16  # W
    read_heads: int = 4  # R
    controller: str = "lstm"  # 'lstm' (the reference) or 'gpt' (a GPT block)
    hidden_size: int = 64  # controller width
    sparse_links: int = 0  # K > 0: sparse temporal links (top-K), for large memory_slots; 0: dense N x N
    optimizer: str = "adamw"  # tasks other than 'lm': 'adamw', 'rmsprop' (the DNC reference's) or 'sgd'
    # algorithmic tasks: random bit patterns
    bits: int = 8
    min_len: int = 1  # pattern length (copy, repeat_copy) or number of items (assoc_recall)
    max_len: int = 20
    min_repeats: int = 1  # repeat_copy
    max_repeats: int = 2
    item_len: int = 3  # assoc_recall: vectors per item
    baseline: bool = True  # also train an LSTM with the DNC's parameter count on the same batches
    # continual learning: max_iters iterations per task, tasks one after another
    n_tasks: int = 20  # pmnist: permutations
    datasets: list[str] = field(default_factory=list)  # lm_sequence: prepared datasets in data_dir, in order
    classifier: str = "linear"  # pmnist: 'linear' (784 -> 10, the reference) or 'mlp' (2 x 256 ReLU)
    methods: list[str] = field(default_factory=lambda: ["finetune", "ewc", "replay"])  # run in turn, same batches
    replay_capacity: int = 15000  # stored examples
    replay_every: int = 1000  # store part of the current batch every this many iterations
    replay_store: int = 32  # rows of that batch stored
    replay_batch: int = 32  # stored examples added to every batch (once any are stored)
    replay_policy: str = "ring"  # 'ring' (newest replace oldest) or 'reservoir' (uniform over all offered)
    ewc_lambda: float = 100.0  # EWC penalty strength
    ewc_samples: int = 500  # examples per task for EWC's Fisher information
    # dialogue (task='dialog'): a seq2seq chatbot (model.Seq2Seq) on data_dir/dataset/dialogs_*.jsonl
    # (python prepare.py dialogs); batch_size counts dialogues, block_size the longest utterance
    n_enc_layer: int = 2
    memory: str = "mnm"  # 'mnm' (memory.MNM) or 'none'
    mnm_heads: int = 4
    mnm_key_size: int = 32
    mnm_hidden: int = 64
    mnm_write: str = "local"  # 'local', 'grad' or 'titans'
    mnm_read: str = "before"  # the decoder reads the memory 'before' or 'after' the turn's own write
    mnm_tbptt: int = 0  # > 0: back-propagate through at most this many turns of memory writes
    dialog_slots: int = 16  # random embedding rows per dialogue, which its fact words are swapped for
    # the elastic vocabulary grows with every new word in the training batches; pruning every
    # vocab_prune_every iterations (0: never) drops words seen < vocab_min_count times, then the least
    # recently seen beyond vocab_capacity
    vocab_prune_every: int = 0
    vocab_min_count: int = 0
    vocab_capacity: int | None = None


ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias")
DIALOG_ARCH_KEYS = ("n_enc_layer", "memory", "mnm_heads", "mnm_key_size", "mnm_hidden", "mnm_write", "mnm_read")


# -----------------------------------------------------------------------------
# distributed helpers

def ddp_info():
    """(is_ddp, rank, local_rank, world_size) from torchrun's environment."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1
    return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def resolve_device(device: str, dtype: str):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return device, dtype


def autocast_context(device: str, dtype: str):
    if dtype == "float32":
        return nullcontext()
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# data: batches as a pure function of (seed, stream, index)

def get_batch(data, rows, block_size, device):
    """rows: start offsets. Returns x, y (len(rows), block_size) int64 on device."""
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in rows]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in rows]).astype(np.int64))
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class DocStream:
    """Document-contiguous batches. Global row g of the n_rows rows of a global batch reads the
    documents order[g], order[g + n_rows], order[g + 2 n_rows], ... (order is a permutation drawn
    from seed, or the file's order when shuffle is False), so the rows share out every document
    once, then start their lists again. Each document is read from its start, one window of
    block_size after another: at iteration i a row reads the i-th window of its endless sequence.
    Windows never cross a document end; the last one of a document is padded (targets -1, ignored
    by the loss). Like batch_offsets, a pure function of (seed, iteration): resumed runs and any
    world size read the same rows."""

    def __init__(self, data, starts, n_rows: int, block_size: int, seed: int, shuffle: bool = True):
        self.data, self.T = data, block_size
        ends = np.r_[starts[1:], len(data)]
        keep = ends - starts >= 2  # a document needs a token to predict
        self.starts, self.ends = starts[keep], ends[keep]
        if len(self.starts) == 0:
            raise DataError("no document has two tokens or more: prepare a dataset of longer documents")
        self.windows = -(-(self.ends - self.starts - 1) // block_size)  # per document, ceil((len - 1) / T)
        n = len(self.starts)
        if n < n_rows:
            raise DataError(f"{n} documents for {n_rows} batch rows (gradient_accumulation_steps x batch_size): "
                            "every row needs a document of its own; use fewer rows or more documents")
        order = np.random.default_rng([seed, 3]).permutation(n) if shuffle else np.arange(n)
        self.docs = [order[g::n_rows] for g in range(n_rows)]
        self.cum = [np.r_[0, np.cumsum(self.windows[d])] for d in self.docs]  # windows before each document

    def locate(self, it: int, row: int):
        """(document, window within it) that global row `row` reads at iteration it."""
        cum = self.cum[row]
        r = it % cum[-1]
        j = int(np.searchsorted(cum, r, side="right")) - 1
        return int(self.docs[row][j]), int(r - cum[j])

    def batch(self, it: int, rows, device: str):
        """x, y (len(rows), T) on device, and last (len(rows),) bool: the window ends its document."""
        T = self.T
        x = np.zeros((len(rows), T), dtype=np.int64)
        y = np.full((len(rows), T), -1, dtype=np.int64)
        last = np.zeros(len(rows), dtype=bool)
        for i, g in enumerate(rows):
            doc, w = self.locate(it, g)
            a = self.starts[doc] + w * T
            n = min(T, self.ends[doc] - 1 - a)  # positions with a next token in this document
            x[i, :n] = self.data[a:a + n]
            y[i, :n] = self.data[a + 1:a + 1 + n]
            last[i] = w == self.windows[doc] - 1
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if device.startswith("cuda"):
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device), torch.from_numpy(last)


def batch_offsets(seed: int, stream: int, index: int, n_rows: int, data_len: int, block_size: int):
    """Start offsets of the `index`-th batch of a stream (0 = training iterations, 1 = train-split
    eval, 2 = val-split eval): the same numbers on every rank and on every restart."""
    if data_len <= block_size:
        raise DataError(f"the split has {data_len} tokens, fewer than block_size + 1 = {block_size + 1}: "
                        "lower block_size or prepare more data")
    rng = np.random.default_rng([seed, stream, index])
    return rng.integers(0, data_len - block_size, size=n_rows)


# -----------------------------------------------------------------------------
# dialogue batches (task='dialog') and the elastic vocabulary they grow

def seeded_generator(*key) -> torch.Generator:
    """A torch generator that is a pure function of key (ints): what resumed and DDP runs redraw."""
    return torch.Generator().manual_seed(int(np.random.default_rng(list(key)).integers(2**62)))


class DialogBatches:
    """Whole dialogues from data_path/dialogs_{train,val}.jsonl, drawn as a pure function of
    (seed, stream, index), turned into Seq2Seq inputs by the elastic vocabulary. The fact words of
    each dialogue (its "entities") are swapped for slot ids with fresh random embedding rows, drawn by
    the rule new words get (model.new_embedding_rows): the model cannot learn those words by heart and
    learns instead to copy what the memory hands back, which is what a word typed at chat time needs.
    Utterances longer than block_size keep their last block_size tokens, replies their first."""

    def __init__(self, data_path, seed, n_slots, block_size):
        self.splits = {}
        for split in ("train", "val"):
            path = os.path.join(data_path, f"dialogs_{split}.jsonl")
            if not os.path.isfile(path):
                raise DataError(f"no {path}: task='dialog' reads dialogues; run: python prepare.py dialogs")
            with open(path) as f:
                self.splits[split] = [json.loads(line) for line in f if line.strip()]
            if not self.splits[split]:
                raise DataError(f"{path} holds no dialogues; prepare it again")
        self.seed, self.n_slots, self.block_size = seed, n_slots, block_size

    def draw(self, split, stream, index, n_rows):
        rng = np.random.default_rng([self.seed, stream, index])
        dialogs = self.splits[split]
        return [dialogs[i] for i in rng.integers(0, len(dialogs), size=n_rows)]

    @staticmethod
    def words(dialogs):
        """Every word of the dialogues except their fact words, in order."""
        out = []
        for d in dialogs:
            entities = {w for e in d["entities"] for w in WordVocab.tokenize(e)}
            for turn in d["turns"]:
                out += [w for w in WordVocab.tokenize(turn["user"] + " " + turn["bot"]) if w not in entities]
        return out

    def tensors(self, dialogs, vocab, embedding, generator, device):
        """(src (B, N, S), tgt (B, N, T), targets (B, N, T), slots (B, K, n_embd)) for Seq2Seq.forward."""
        B, N, V, K = len(dialogs), max(len(d["turns"]) for d in dialogs), len(vocab), self.n_slots
        encoded = []
        for d in dialogs:
            entities = sorted({w for e in d["entities"] for w in WordVocab.tokenize(e)})
            if len(entities) > K:
                raise DataError(f"a dialogue has {len(entities)} fact words, more than dialog_slots={K}; raise it")
            slot_of = {w: V + int(j) for w, j in zip(entities, torch.randperm(K, generator=generator))}
            ids = lambda text: [slot_of.get(w, vocab.stoi.get(w, vocab.unk)) for w in WordVocab.tokenize(text)]
            encoded.append([(ids(t["user"])[-self.block_size:], ids(t["bot"])[:self.block_size - 1])
                            for t in d["turns"]])
        S = max(len(u) for turns in encoded for u, _ in turns)
        T = max(len(r) for turns in encoded for _, r in turns) + 1
        src = torch.full((B, N, S), vocab.pad, dtype=torch.long)
        tgt = torch.full((B, N, T), vocab.pad, dtype=torch.long)
        targets = torch.full((B, N, T), -1, dtype=torch.long)
        for b, turns in enumerate(encoded):
            for n, (u, r) in enumerate(turns):
                src[b, n, :len(u)] = torch.tensor(u, dtype=torch.long)
                tgt[b, n, :len(r) + 1] = torch.tensor([vocab.bos] + r, dtype=torch.long)
                targets[b, n, :len(r) + 1] = torch.tensor(r + [vocab.eos], dtype=torch.long)
        slots = new_embedding_rows(embedding, B * K, generator).view(B, K, -1)
        return src.to(device), tgt.to(device), targets.to(device), slots.to(device)


def grow_vocab(vocab, model, words, step, optimizer=None, generator=None) -> list[str]:
    """Add the unknown words to the vocabulary and the model (new embedding rows, optimizer state
    resized in step) and count every word as seen at `step`. Returns the new words."""
    new = vocab.add(words, step)
    if new:
        remap_vocab(model, range(len(vocab) - len(new)), len(new), optimizer, generator)
    vocab.observe([vocab.stoi[w] for w in words], step)
    return new


def prune_vocab(vocab, model, min_count=0, capacity=None, optimizer=None, keep=()) -> list[str]:
    """Prune the vocabulary (prepare.WordVocab.prune) and remap the model's embedding rows and the
    optimizer's state the same way. Returns the words dropped."""
    before = list(vocab.words)
    alive = vocab.prune(min_count, capacity, keep)
    if len(alive) < len(before):
        remap_vocab(model, alive, 0, optimizer)
    return sorted(set(before) - set(vocab.words))


# -----------------------------------------------------------------------------
# RNG state: everything a resumed run needs to draw the same numbers (dropout, user code)

def get_rng_state():
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# -----------------------------------------------------------------------------

def get_lr(it: int, cfg: TrainConfig) -> float:
    if not cfg.decay_lr:
        return cfg.learning_rate
    decay_iters = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend: plots are written on machines without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_json(path: str, obj):
    """A result file (sample.py, tasks.py, bench.py), written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), "w")


def save_figure(fig, path: str):
    """A matplotlib figure as PNG, written atomically; the figure is closed."""
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    pyplot().close(fig)


def plot_losses(metrics_path: str, png_path: str):
    """Training and validation loss against iteration, from metrics.jsonl."""
    plt = pyplot()
    train, evals = [], []
    with open(metrics_path) as f:
        for line in f:
            m = json.loads(line)
            if "loss" in m:
                train.append((m["iter"], m["loss"]))
            if "val_loss" in m:
                evals.append((m["iter"], m["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (logged iterations)", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, png_path)


def main(cfg: TrainConfig) -> dict:
    """Train as cfg says; returns {'losses': {iter: loss}, 'val_loss': ..., 'iter_num': ...}.
    A task other than 'lm' runs in tasks.py and returns its own results."""
    if cfg.task not in ("lm", "dialog"):
        import tasks  # the DNC's algorithmic tasks and continual learning
        return tasks.main(cfg)
    ddp, rank, local_rank, world_size = ddp_info()
    master_process = rank == 0
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    try:
        result = _train(cfg, ddp, rank, world_size, master_process, device, dtype)
        if ddp:
            # DDP keeps the process group, and so gloo's worker threads, alive to interpreter exit. A rank
            # that left straight after its last collective could exit while a worker still frees that
            # collective's Python-made tensors: the worker then takes the GIL of a finalised interpreter
            # and the process aborts ("terminate called without an active exception"). The barrier waits
            # out every earlier collective on every rank first.
            dist.barrier()
        return result
    finally:
        if ddp:
            dist.destroy_process_group()


def _train(cfg, ddp, rank, world_size, master_process, device, dtype):
    if cfg.gradient_accumulation_steps % world_size != 0:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple "
                          f"of the number of processes ({world_size})")
    micro_steps = cfg.gradient_accumulation_steps // world_size  # this rank's share
    global_rows = cfg.gradient_accumulation_steps * cfg.batch_size
    tokens_per_iter = global_rows * cfg.block_size
    print0(f"settings:\n{format_config(cfg)}")
    print0(f"device {device}, dtype {dtype}, {world_size} process(es), tokens per iteration {tokens_per_iter:,}")
    if master_process:
        os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)  # same init on every rank; reseeded per rank below for dropout
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ctx = autocast_context(device, dtype)

    data_path = os.path.join(cfg.data_dir, cfg.dataset)
    meta = load_meta(data_path)
    splits = {s: open_split(data_path, s, meta) for s in ("train", "val")}
    if (cfg.task == "dialog" or cfg.mnm_layer >= 0) and cfg.mnm_write not in MNM_WRITES:
        raise ConfigError(f"mnm_write must be one of {MNM_WRITES}, got {cfg.mnm_write!r}")
    dialogs = vocab = None  # task='dialog': the dialogue batches and the elastic vocabulary
    if cfg.task == "dialog":
        if cfg.memory not in ("mnm", "none") or cfg.mnm_read not in ("before", "after"):
            raise ConfigError(f"memory must be 'mnm' or 'none' (got {cfg.memory!r}) and mnm_read 'before' or "
                              f"'after' (got {cfg.mnm_read!r})")
        dialogs = DialogBatches(data_path, cfg.seed, cfg.dialog_slots, cfg.block_size)
        vocab = WordVocab()  # starts with the special tokens; grows as the batches bring words

    # model
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = None
    iter_num, best_val_loss = 0, float("inf")
    if cfg.init_from == "scratch" and dialogs is not None:
        model = Seq2Seq(Seq2SeqConfig(
            block_size=cfg.block_size, vocab_size=len(vocab), n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, n_enc_layer=cfg.n_enc_layer, memory=cfg.memory,
            mnm_heads=cfg.mnm_heads, mnm_key_size=cfg.mnm_key_size, mnm_hidden=cfg.mnm_hidden,
            mnm_write=cfg.mnm_write, mnm_read=cfg.mnm_read, mnm_tbptt=cfg.mnm_tbptt))
    elif cfg.init_from == "scratch":
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=meta["vocab_size"], n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
                              knn_layer=cfg.knn_layer, knn_topk=cfg.knn_topk, knn_memory_size=cfg.knn_memory_size,
                              knn_search_dtype=cfg.knn_search_dtype, mnm_layer=cfg.mnm_layer,
                              mnm_heads=cfg.mnm_heads, mnm_key_size=cfg.mnm_key_size, mnm_hidden=cfg.mnm_hidden,
                              mnm_write=cfg.mnm_write))
    elif cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        saved = ckpt["model_args"]
        keys = ARCH_KEYS + (DIALOG_ARCH_KEYS if dialogs is not None
                            else MNM_SHAPE_KEYS if saved.get("mnm_layer", -1) >= 0 else ())
        if (saved.get("model_type") == "seq2seq") != (dialogs is not None):
            raise ConfigError(f"cannot resume {ckpt_path} with task={cfg.task!r}: it holds a "
                              f"{saved.get('model_type', 'gpt')} model; use the task it was trained with")
        clash = {k: (saved[k], getattr(cfg, k)) for k in keys if saved[k] != getattr(cfg, k)}
        if clash:
            raise ConfigError(f"cannot resume {ckpt_path}: the settings change the model's shape "
                              + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in clash.items())
                              + "; use the settings it was trained with")
        for key in ("knn_layer", "mnm_layer"):
            if saved.get(key, -1) != getattr(cfg, key):
                raise ConfigError(f"cannot resume {ckpt_path}: it was trained with {key}={saved.get(key, -1)}, "
                                  f"the settings say {getattr(cfg, key)}; use the settings it was trained with")
        check_meta_compatible(ckpt["meta"], meta)
        model = model_from_checkpoint(ckpt, dropout=cfg.dropout)
        if dialogs is not None:
            vocab = WordVocab.from_dict(ckpt["vocab"])
            model.config.mnm_tbptt = cfg.mnm_tbptt  # a training choice, not the model's shape
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        print0(f"resuming from {ckpt_path} at iteration {iter_num}")
    else:  # pretrained GPT-2: a hub name or a local folder
        if meta["tokenizer"] != "gpt2":
            raise DataError(f"init_from={cfg.init_from!r} needs GPT-2 tokens, but {data_path} was prepared with "
                            f"the {meta['tokenizer']!r} tokenizer: prepare it with --tokenizer gpt2")
        model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        if cfg.knn_layer >= 0:  # a memorizing layer on top of pretrained weights, as Wu et al. fine-tune
            add_memorizing_layer(model, cfg.knn_layer, cfg.knn_topk, cfg.knn_memory_size, cfg.knn_search_dtype)
        if cfg.mnm_layer >= 0:
            add_mnm_block(model, cfg.mnm_layer, cfg.mnm_heads, cfg.mnm_key_size, cfg.mnm_hidden, cfg.mnm_write)
    if dialogs is None and model.config.vocab_size < meta["vocab_size"]:
        raise DataError(f"{data_path} has {meta['vocab_size']} token ids, the model only {model.config.vocab_size}")
    block_size = model.config.block_size
    model.to(device)
    mnm = mnm_block(model)
    # memories with a row per batch row of every micro-step, emptied at document ends, by checkpoint key
    row_mems = {name: m for name, m in (("knn_memory", memorizing_layer(model)), ("mnm_memory", mnm)) if m is not None}
    docs = cfg.loader == "docs"
    if cfg.loader not in ("random", "docs"):
        raise ConfigError(f"loader={cfg.loader!r}; choose 'random' or 'docs'")
    if row_mems and not docs:
        raise ConfigError("a memorizing layer (knn_layer >= 0) or an MNM block (mnm_layer >= 0) remembers the "
                          "earlier windows of each row's document: set loader='docs' (and prepare a dataset with "
                          "document boundaries)")
    if docs:
        streams = {s: DocStream(splits[s], load_doc_starts(data_path, s, len(splits[s])), global_rows, block_size,
                                cfg.seed, shuffle=s == "train") for s in ("train", "val")}
    local_rows = micro_steps * cfg.batch_size  # memory rows of this rank: every micro-step's batch rows
    for m in row_mems.values():
        m.reset(local_rows)
    print0(f"model: {model.get_num_params() / 1e6:.2f}M parameters, {model_args(model)}")

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        for name, m in row_mems.items():
            state = ckpt.get(name)  # rows of the whole global batch, in global row order
            if not state:
                continue
            n = next(iter(state.values())).size(0)
            if n != global_rows:
                raise ConfigError(f"{ckpt_path} holds memories of {n} batch rows, this run "
                                  f"has {global_rows}: resume with the batch_size and gradient_accumulation_steps "
                                  "it was trained with")
            m.set_state({k: v[rank * local_rows:(rank + 1) * local_rows].to(device) for k, v in state.items()})
        states = ckpt["rng"]
        if len(states) == world_size:
            set_rng_state(states[rank])
        else:
            print0(f"warning: checkpoint holds RNG states of {len(states)} process(es), this run has "
                   f"{world_size}: dropout draws will differ from an uninterrupted run")
        ckpt = None  # free the memory
    else:
        torch.manual_seed(cfg.seed + rank)

    raw_model = model  # saved and sampled: never carries compile's or DDP's prefixes

    def wrap(model):  # again whenever the vocabulary changes the embedding Parameter
        if cfg.compile:
            print0("compiling the model...")
            model = torch.compile(model)
        if ddp:
            model = DDP(model, device_ids=[device] if device_type == "cuda" else None)
        return model

    model = wrap(raw_model)

    def draw(split, stream, index, n_rows):
        """The index-th batch of a stream, n_rows rows: a pure function of (seed, stream, index)."""
        if dialogs is not None:
            return dialogs.draw(split, stream, index, n_rows)
        return batch_offsets(cfg.seed, stream, index, n_rows, len(splits[split]), block_size)

    def tensors(split, rows, *key):
        """The model's inputs for drawn rows; key (stream, index, first row) seeds the slot rows."""
        if dialogs is not None:
            return dialogs.tensors(rows, vocab, raw_model.transformer.wte.weight,
                                   seeded_generator(cfg.seed, *key), device)
        return get_batch(splits[split], rows, block_size, device)

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters fixed batches per split, shared out over the ranks."""
        out = {}
        model.eval()
        if docs:
            out = estimate_loss_docs()
            model.train()
            return out
        for stream, split in ((1, "train"), (2, "val")):
            total = torch.zeros((), device=device)
            for k in range(rank, cfg.eval_iters, world_size):
                batch = tensors(split, draw(split, stream, k, cfg.batch_size), stream, k, 0)
                with ctx:
                    _, loss = raw_model(*batch)
                total += loss.float()
            if ddp:
                dist.all_reduce(total)
            out[split] = total.item() / cfg.eval_iters
        model.train()
        return out

    def docs_step(stream, it, micro, train_step):
        """Forward one micro-step of document-contiguous rows; a row's memory empties when its document ends."""
        lo = (rank * micro_steps + micro) * cfg.batch_size
        X, Y, last = stream.batch(it, range(lo, lo + cfg.batch_size), device)
        for m in row_mems.values():
            m.rows = slice(micro * cfg.batch_size, (micro + 1) * cfg.batch_size)
        with ctx:
            _, loss = (model if train_step else raw_model)(X, Y)
            if train_step and mnm is not None:  # the MNM's write path learns from its write loss
                loss = loss + MNM.write_loss_weight * mnm.write_loss
        for m in row_mems.values():
            m.clear_rows(micro * cfg.batch_size + last.nonzero().squeeze(1))
        return loss, (Y >= 0).sum()

    @torch.no_grad()
    def estimate_loss_docs():
        """Loss per token over the first eval_iters iterations of each split's document stream (in file
        order, laid out like training batches; weighted by tokens, as the last window of a document is
        short), every row's memory starting empty; the training memories are put back afterwards."""
        saved = {name: m.get_state() for name, m in row_mems.items()}
        out = {}
        for split in ("train", "val"):
            for m in row_mems.values():
                m.reset(local_rows)
            total = torch.zeros(2, device=device)  # summed loss, tokens
            for k in range(cfg.eval_iters):
                for micro in range(micro_steps):
                    loss, n = docs_step(streams[split], k, micro, False)
                    total += torch.stack([loss.float() * n, n.float()])
            if ddp:
                dist.all_reduce(total)
            out[split] = (total[0] / total[1]).item()
        for name, m in row_mems.items():
            m.reset(local_rows)
            m.set_state(saved[name])
        return out

    # metrics.jsonl: one JSON line per logged iteration / evaluation; a resumed run drops the
    # lines from iterations it is about to redo
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if master_process:
        kept = []
        if cfg.init_from == "resume" and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["iter"] < iter_num]
        with open(metrics_path, "w") as f:
            f.writelines(kept)

    def log_metrics(record):
        if master_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if cfg.wandb_log:
                wandb.log(record, step=record["iter"])

    if cfg.wandb_log and master_process:
        import wandb
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))

    def save_checkpoint():
        rng = [None] * world_size
        if ddp:
            dist.all_gather_object(rng, get_rng_state())
        else:
            rng = [get_rng_state()]
        mem_states = {}
        for name, m in row_mems.items():  # every rank's memories, in global row order, for an exact resume
            parts = [{k: v.cpu() for k, v in m.get_state().items()}]
            if ddp:
                mine, parts = parts[0], [None] * world_size
                dist.all_gather_object(parts, mine)
            mem_states[name] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts[0] else {}
        if master_process:
            checkpoint = {
                "model": raw_model.state_dict(),
                "model_args": model_args(raw_model),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "iter_num": iter_num,
                "best_val_loss": best_val_loss,
                "config": asdict(cfg),
                "meta": meta,
                "rng": rng,
                "vocab": vocab.to_dict() if vocab is not None else None,
                # batches are a pure function of (seed, iteration): this is the sampler's whole state
                "sampler": {"seed": cfg.seed, "next_iter": iter_num, "loader": cfg.loader},
                **mem_states,
            }
            atomic_save(checkpoint, ckpt_path)
            print0(f"saved checkpoint to {ckpt_path}")

    device_name = torch.cuda.get_device_name(device) if device_type == "cuda" else None
    losses: dict[int, float] = {}
    val_loss = None
    start_iter = iter_num
    t0 = time.time()
    dt_avg = None
    model.train()
    while True:
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only:
            ev = estimate_loss()
            val_loss = ev["val"]
            print0(f"step {iter_num}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}")
            log_metrics({"iter": iter_num, "train_loss": ev["train"], "val_loss": ev["val"]})
            improved = ev["val"] < best_val_loss
            best_val_loss = min(best_val_loss, ev["val"])
            if iter_num > start_iter and (improved or cfg.always_save_checkpoint):
                save_checkpoint()
                if master_process:
                    plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
            t0 = time.time()  # evaluation is not training time
        if iter_num >= cfg.max_iters or cfg.eval_only:
            break

        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if not docs:
            offsets = draw("train", 0, iter_num, global_rows)
        if vocab is not None:  # every rank sees the whole global batch's words, so all grow alike
            pruned = []
            if cfg.vocab_prune_every and iter_num and iter_num % cfg.vocab_prune_every == 0:
                pruned = prune_vocab(vocab, raw_model, cfg.vocab_min_count, cfg.vocab_capacity, optimizer)
            new = grow_vocab(vocab, raw_model, DialogBatches.words(offsets), iter_num, optimizer,
                             seeded_generator(cfg.seed, 3, iter_num))
            if new or pruned:
                print0(f"iter {iter_num}: vocabulary {len(vocab)} words (+{len(new)}, -{len(pruned)})")
                model = wrap(raw_model)
        loss_sum = torch.zeros((), device=device)
        for micro in range(micro_steps):
            lo = (rank * micro_steps + micro) * cfg.batch_size
            if not docs:
                batch = tensors("train", offsets[lo:lo + cfg.batch_size], 0, iter_num, lo)
            # gradients are all-reduced only on the last micro-step
            sync = nullcontext() if (not ddp or micro == micro_steps - 1) else model.no_sync()
            with sync:
                if docs:  # like random windows, each micro-step's mean counts the same
                    loss = docs_step(streams["train"], iter_num, micro, True)[0] / micro_steps
                else:
                    with ctx:
                        _, loss = model(*batch)
                        loss = loss / micro_steps
                scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % cfg.log_interval == 0:
            if ddp:  # the loss of the whole global batch, not only rank 0's share
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            lossf = loss_sum.item()
            losses[iter_num] = lossf
            if iter_num > start_iter:  # the first iteration pays for warm-up / compilation
                dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
            tok_s = tokens_per_iter / dt
            mfu = raw_model.estimate_mfu(tok_s / world_size, device_name, dtype)
            eta = (cfg.max_iters - iter_num - 1) * (dt_avg or dt)
            mfu_s = f"{mfu * 100:.2f}%" if mfu is not None else "unknown"
            print0(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, tok/s {tok_s:,.0f}, "
                   f"mfu {mfu_s}, lr {lr:.3e}, eta {int(eta // 60)}m{int(eta % 60):02d}s")
            log_metrics({"iter": iter_num, "loss": lossf, "lr": lr, "dt_ms": dt * 1000, "tok_per_s": tok_s,
                         "mfu": mfu})
        iter_num += 1

    if cfg.wandb_log and master_process:
        wandb.finish()
    return {"losses": losses, "val_loss": val_loss, "iter_num": iter_num}


if __name__ == "__main__":
    try:
        main(load_config(TrainConfig))
    except (ConfigError, DataError, CheckpointError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
