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

from chat import DialogBatches, Seq2Seq, Seq2SeqConfig, grow_vocab, prune_vocab
from checkpoint import CheckpointError, load_checkpoint, memory_args, model_args, model_from_checkpoint
from common import (atomic_save, atomic_write, autocast_context, ddp_info, get_lr, get_rng_state, print0, pyplot,
                    resolve_device, save_figure, seeded_generator, set_rng_state)
from configurator import ConfigError, format_config, load_config
from data import DocStream, batch_offsets, get_batch
from memory import MNM, MNMBlock, MemoryConfig, attach_memories, mnm_block, row_memories
from model import GPT, GPTConfig
from prepare import DataError, WordVocab, check_meta_compatible, load_doc_starts, load_meta, open_split
import tasks  # the DNC's algorithmic tasks and continual learning (task != 'lm')


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
MNM_SHAPE_KEYS = ("mnm_heads", "mnm_key_size", "mnm_hidden", "mnm_write")


def memory_config(cfg) -> MemoryConfig:
    return MemoryConfig(**{k: getattr(cfg, k) for k in MemoryConfig.__dataclass_fields__})
DIALOG_ARCH_KEYS = ("n_enc_layer", "memory", "mnm_heads", "mnm_key_size", "mnm_hidden", "mnm_write", "mnm_read")



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
    if (cfg.task == "dialog" or cfg.mnm_layer >= 0) and cfg.mnm_write not in MNM.WRITES:
        raise ConfigError(f"mnm_write must be one of {MNM.WRITES}, got {cfg.mnm_write!r}")
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
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
        attach_memories(model, memory_config(cfg))
    elif cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        saved = {**ckpt["memory_args"], **ckpt["model_args"]}
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
        attach_memories(model, memory_config(cfg))  # e.g. a memorizing layer on pretrained weights, as Wu et al.
    if dialogs is None and model.config.vocab_size < meta["vocab_size"]:
        raise DataError(f"{data_path} has {meta['vocab_size']} token ids, the model only {model.config.vocab_size}")
    block_size = model.config.block_size
    model.to(device)
    mnm = mnm_block(model)
    # memories with a row per batch row of every micro-step, emptied at document ends, by checkpoint key
    row_mems = row_memories(model)
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
                "memory_args": memory_args(raw_model),
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

