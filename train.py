"""
Train a GPT. One process:

    python train.py config/train_facts.py --max_iters=500

Many processes, one per GPU (or CPU processes with gloo), through DistributedDataParallel:

    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Batches are a pure function of (seed, iteration): the global batch of iteration i is the same
rows whatever the world size, each rank taking its share of the micro-steps. That is what makes
a resumed run equal an uninterrupted one and N processes equal one.

`task` picks the program and its settings: 'lm' (TrainConfig, the GPT), 'dialog' (DialogConfig,
the seq2seq chatbot), both trained by the loop below, which reads its data through a data.Source;
or one of tasks.py's programs (tasks.TaskConfig: the DNC's algorithmic tasks, continual learning).
"""

import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import tasks  # the DNC's algorithmic tasks and continual learning (task != 'lm', 'dialog')
from chat import Seq2Seq, Seq2SeqConfig
from checkpoint import CheckpointError, load_checkpoint, memory_args, model_args, model_from_checkpoint
from common import (atomic_save, autocast_context, cli, ddp_info, get_lr, get_rng_state, print0, pyplot,
                    resolve_device, save_figure, set_rng_state)
from configurator import ConfigError, above, at_least, format_config, load_program, need, one_of, within
from data import Dialogs, DocStreams, Layout, RandomWindows
from memory import MEMORIZING_GATE_INIT, MNM, MemoryConfig, MemorizingMemory, attach_memories
from model import GPT, GPTConfig, pretrained_tokenizer_meta
from prepare import DataError, check_meta_compatible, load_meta
from runs import MetricsLog, OutDirError, RunConfig, check_init_from, prepare_out_dir, read_metrics


@dataclass
class LoopConfig(RunConfig):
    """The settings of the training loop below, for both programs it runs (TrainConfig, DialogConfig)."""
    eval_only: bool = False  # evaluate once and exit
    always_save_checkpoint: bool = True  # False: keep only the checkpoint with the best val loss
    wandb_log: bool = False
    wandb_project: str = "mnemo"
    wandb_run_name: str = "run"
    dataset: str = "facts"  # the dataset lives in data_dir/dataset (what prepare.py writes)
    gradient_accumulation_steps: int = 1  # micro-steps per global batch, shared out over the ranks
    dtype: str = "auto"  # 'auto' (bfloat16 on GPUs that have it, else float16 on GPU, float32 on CPU), 'float32', 'bfloat16', 'float16'

    def validate(self):
        super().validate()
        at_least(self, 1, "gradient_accumulation_steps")
        one_of(self, "dtype", ("auto", "float32", "bfloat16", "float16"))

    def shape(self) -> dict:
        return dict(block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                    dropout=self.dropout, bias=self.bias)


@dataclass
class TrainConfig(LoopConfig):
    """task='lm': a GPT on a prepared dataset, with the trainable memories of memory.MemoryConfig."""
    PROGRAM = "task='lm'"
    task: str = "lm"  # the program: 'lm', 'dialog', or one of tasks.py's (tasks.TaskConfig)
    loader: str = "random"  # 'random': windows at random offsets; 'docs': every batch row reads its own
    # documents window after window (data.DocStreams), which the memories below need
    # > 0 (loader='docs', a long-range dataset: passkey, facts_long): add answer_loss x the mean loss over the
    # tokens of the queries' answers; a handful among ~1,000 predictable tokens a batch, they teach the lookup
    # slowly otherwise (docs/long-range.md)
    answer_loss: float = 0.0
    # Memorizing Transformer layer: kNN attention over each batch row's memory of its document's earlier
    # windows at this layer, -1 = none
    knn_layer: int = -1
    knn_topk: int = 32
    knn_memory_size: int = 16384  # entries per batch row and head
    knn_search_dtype: str = "float32"  # 'bfloat16': about 2x faster retrieval on CPUs with AVX512-BF16 (see MemoryConfig)
    knn_gate_init: float = MEMORIZING_GATE_INIT  # the gates' starting logit (sigmoid: the memory's first share)
    knn_grad_windows: int = 0  # >0: gradients through the entries of each row's latest windows (MemoryConfig)
    knn_mix: str = "gate"  # 'gate' (a learned share per head) or 'joint' (one softmax over window and memory)
    knn_learn_scale: bool = False  # True: a learned per-head factor on the memory's scores (MemoryConfig)
    knn_distance: int = 0  # rotary: memory entries are scored as keys this many tokens back (MemoryConfig)
    # metalearned neural memory (memory.MNMBlock) after this layer's block, written window by window with each
    # row's document, -1 = none; shaped by mnm_heads, mnm_key_size, mnm_hidden, mnm_write
    mnm_layer: int = -1
    mnm_heads: int = 4
    mnm_key_size: int = 32
    mnm_hidden: int = 64
    mnm_write: str = "local"  # 'local', 'grad' or 'titans'
    mnm_grad_windows: int = 0  # G: the task loss also trains the latest G windows' writes (MemoryConfig)
    mnm_pool: bool = False  # True: one attention-pooled write per window and head (MemoryConfig)
    mnm_shift: bool = False  # True: a token's key is written with the next token's value (MemoryConfig)
    mnm_value: str = "hidden"  # 'token': a pair's value is the next token's embedding (MemoryConfig)
    mnm_tie_keys: bool = False  # True: a token reads under its write key (MemoryConfig)
    mnm_write_penalty: float = 0.0  # > 0: an L1 cost on the write strengths, so filler may go unwritten (MemoryConfig)
    mnm_write_budget: float = 1.0  # full write steps a window may spend per head (MemoryConfig)
    mnm_key_spread: float = 0.0  # > 0: a cost on similar write keys within a window (MemoryConfig)
    pos: str = "learned"  # positions of a new model: 'learned' (GPT-2's table) or 'rope' (rotary, as Llama)

    def validate(self):
        super().validate()
        one_of(self, "task", ("lm",))
        one_of(self, "pos", ("learned", "rope"))
        check_init_from(self.init_from)
        one_of(self, "loader", ("random", "docs"))
        one_of(self, "knn_search_dtype", ("float32", "bfloat16"))
        one_of(self, "knn_mix", MemorizingMemory.MIXES)
        one_of(self, "mnm_write", MNM.WRITES)
        one_of(self, "mnm_value", MNM.VALUES)
        at_least(self, -1, "knn_layer", "mnm_layer")
        at_least(self, 1, "knn_topk", "knn_memory_size", "mnm_heads", "mnm_key_size", "mnm_hidden")
        at_least(self, 0, "knn_distance", "knn_grad_windows", "mnm_grad_windows", "answer_loss", "mnm_write_penalty",
                 "mnm_key_spread")
        why = MemorizingMemory.distance_conflict(self.knn_distance, self.pos)
        need(why is None, why)
        above(self, 0, "mnm_write_budget")
        why = MNM.conflict(pool=self.mnm_pool, shift=self.mnm_shift, value=self.mnm_value, key_spread=self.mnm_key_spread)
        need(why is None, why)
        need(self.loader == "docs" or self.answer_loss == 0, "answer_loss weighs the answers of a long-range "
             "dataset's queries, which only loader='docs' reads: set loader='docs' or answer_loss=0")
        within(self, -10, 10, "knn_gate_init")
        if self.init_from == "scratch":
            need(max(self.knn_layer, self.mnm_layer) < self.n_layer, f"knn_layer={self.knn_layer} and mnm_layer="
                 f"{self.mnm_layer} must be < n_layer={self.n_layer} (a layer of the model) or -1 (none)")
        need(self.loader == "docs" or max(self.knn_layer, self.mnm_layer) < 0, "a memorizing layer (knn_layer >= 0) "
             "or an MNM block (mnm_layer >= 0) remembers the earlier windows of each row's document: set "
             "loader='docs' (and prepare a dataset with document boundaries)")

    def memory_config(self) -> MemoryConfig:
        return MemoryConfig(**{f.name: getattr(self, f.name) for f in fields(MemoryConfig)})

    def new_model(self, vocab_size):
        return attach_memories(GPT(GPTConfig(vocab_size=vocab_size, pos=self.pos, **self.shape())), self.memory_config())

    # memory settings a resumed run takes from its own settings, not the checkpoint's: they change how the
    # memory is searched, mixed or trained, no weight (e.g. a last stage with knn_mix='joint', or a larger topk)
    RESUME_CHOICES = ("knn_topk", "knn_distance", "knn_search_dtype", "knn_grad_windows", "knn_mix",
                      "mnm_grad_windows", "mnm_write_penalty", "mnm_write_budget", "mnm_key_spread")

    def shape_keys(self, saved: dict) -> tuple:
        """The settings a resumed checkpoint must agree with."""
        mnm = ("mnm_heads", "mnm_key_size", "mnm_hidden", "mnm_write", "mnm_pool", "mnm_shift", "mnm_value",
               "mnm_tie_keys") if saved.get("mnm_layer", -1) >= 0 else ()
        knn = ("knn_memory_size", "knn_learn_scale") if saved.get("knn_layer", -1) >= 0 else ()  # the saved rows' length
        # rotary positions have no table: a model without trainable memories (whose rows hold windows) may
        # resume with another context, e.g. a long-context stage after short documents (the oracle recipes)
        free = saved.get("pos") == "rope" and max(saved.get("knn_layer", -1), saved.get("mnm_layer", -1)) < 0
        block = () if free else ("block_size",)
        return ("n_layer", "n_head", "n_embd", "bias", "pos", "knn_layer", "mnm_layer") + block + knn + mnm


@dataclass
class DialogConfig(LoopConfig):
    """task='dialog': the seq2seq chatbot (chat.Seq2Seq) on data_dir/dataset/dialogs_*.jsonl (python prepare.py
    dialogs); batch_size counts dialogues, block_size the longest utterance, n_layer the decoder blocks."""
    PROGRAM = "task='dialog'"
    task: str = "dialog"
    dataset: str = "dialogs"
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

    def validate(self):
        super().validate()
        one_of(self, "task", ("dialog",))
        check_init_from(self.init_from, allowed=("scratch", "resume"))
        one_of(self, "memory", ("mnm", "none"))
        one_of(self, "mnm_read", ("before", "after"))
        one_of(self, "mnm_write", MNM.WRITES)
        at_least(self, 1, "mnm_heads", "mnm_key_size", "mnm_hidden", "dialog_slots", "vocab_capacity")
        at_least(self, 0, "n_enc_layer", "mnm_tbptt", "vocab_prune_every", "vocab_min_count")

    def new_model(self, vocab_size):
        extra = {f.name: getattr(self, f.name) for f in fields(Seq2SeqConfig) if f.name not in GPTConfig.__dataclass_fields__
                 and f.name != "model_type"}
        return Seq2Seq(Seq2SeqConfig(vocab_size=vocab_size, **self.shape(), **extra))

    def shape_keys(self, saved: dict) -> tuple:
        return ("n_layer", "n_head", "n_embd", "block_size", "bias", "n_enc_layer", "memory", "mnm_heads",
                "mnm_key_size", "mnm_hidden", "mnm_write", "mnm_read")


PROGRAMS = {"lm": TrainConfig, "dialog": DialogConfig, **dict.fromkeys(tasks.TASKS, tasks.TaskConfig)}


def load_settings(argv: list[str] | None = None, **overrides):
    """The settings of the program that argv's (or the overrides') `task` chooses."""
    return load_program(PROGRAMS, argv, "task", "lm", **overrides)


# -----------------------------------------------------------------------------

def main(cfg) -> dict:
    """Train as cfg says; returns {'losses': {iter: loss}, 'val_loss': ..., 'iter_num': ...}.
    A program of tasks.py runs there and returns its own results."""
    if isinstance(cfg, tasks.TaskConfig):
        return tasks.main(cfg)
    cfg.validate()
    ddp, rank, local_rank, world_size = ddp_info()
    need(cfg.gradient_accumulation_steps % world_size == 0, f"gradient_accumulation_steps="
         f"{cfg.gradient_accumulation_steps} must be a multiple of the number of processes ({world_size})")
    prepare_out_dir(cfg.out_dir, cfg.init_from != "resume", cfg.overwrite, master=rank == 0)
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    layout = Layout(rank, world_size, cfg.gradient_accumulation_steps // world_size, cfg.batch_size, device,
                    autocast_context(device, dtype), ddp)
    try:
        result = train(cfg, layout, dtype)
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


def train(cfg, layout: Layout, dtype: str) -> dict:
    master, device = layout.rank == 0, layout.device
    tokens_per_iter = layout.global_rows * cfg.block_size
    print0(f"settings:\n{format_config(cfg)}")
    print0(f"device {device}, dtype {dtype}, {layout.world_size} process(es), tokens per iteration {tokens_per_iter:,}")
    torch.manual_seed(cfg.seed)  # same init on every rank; reseeded per rank below for dropout
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_type = "cuda" if device.startswith("cuda") else "cpu"

    # data, model, optimizer; a resumed run takes them all back from the checkpoint
    data_path = os.path.join(cfg.data_dir, cfg.dataset)
    meta = load_meta(data_path)
    source = open_source(cfg, data_path, meta, layout)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path) if cfg.init_from == "resume" else None
    model = init_model(cfg, source, meta, ckpt).to(device)  # saved and sampled: never wrapped by compile or DDP
    source.bind(model)
    print0(f"model: {model.get_num_params() / 1e6:.2f}M parameters, {model_args(model)}")
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        iter_num, best_val_loss = restore(ckpt, optimizer, scaler, source, layout)
        print0(f"resuming from {ckpt_path} at iteration {iter_num}")
        ckpt = None  # free the memory
    else:
        torch.manual_seed(cfg.seed + layout.rank)
    wandb = start_wandb(cfg) if cfg.wandb_log and master else None
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    also = (lambda record: wandb.log(record, step=record["iter"])) if wandb else None
    log = MetricsLog(metrics_path, iter_num if cfg.init_from == "resume" else None, master, also)
    step_model = wrap(model, cfg, layout)  # what the training step calls: compiled and/or DDP

    device_name = torch.cuda.get_device_name(device) if device_type == "cuda" else None
    losses, val_loss, start_iter, dt_avg = {}, None, iter_num, None
    t0 = time.time()
    model.train()
    while True:
        # evaluate the train and val loss; save a checkpoint
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only:
            model.eval()
            ev = source.estimate_loss(model)
            model.train()
            val_loss = ev["val"]
            print0(f"step {iter_num}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}")
            log({"iter": iter_num, "train_loss": ev["train"], "val_loss": ev["val"]})
            improved, best_val_loss = ev["val"] < best_val_loss, min(best_val_loss, ev["val"])
            if iter_num > start_iter and (improved or cfg.always_save_checkpoint):
                save_checkpoint(ckpt_path, cfg, model, optimizer, scaler, source, meta, iter_num, best_val_loss)
                if master:
                    plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
            t0 = time.time()  # evaluation is not training time
        if iter_num >= cfg.max_iters or cfg.eval_only:
            break

        # one step: the global batch in micro-steps, gradients all-reduced on the last one only
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if source.before_step(iter_num, optimizer):  # the vocabulary grew: a new embedding Parameter
            step_model = wrap(model, cfg, layout)
        loss_sum = torch.zeros((), device=device)
        for micro in range(layout.micro_steps):
            batch = source.batch(iter_num, micro)
            last = micro == layout.micro_steps - 1
            with nullcontext() if not layout.ddp or last else step_model.no_sync():
                loss = source.loss(step_model, batch) / layout.micro_steps  # each micro-step's mean counts the same
                scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        # timing and logging
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % cfg.log_interval == 0:
            if layout.ddp:  # the loss of the whole global batch, not only rank 0's share
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            lossf = losses[iter_num] = loss_sum.item()
            if iter_num > start_iter:  # the first iteration pays for warm-up / compilation
                dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
            tok_s = tokens_per_iter / dt
            mfu = model.estimate_mfu(tok_s / layout.world_size, device_name, dtype)
            eta = (cfg.max_iters - iter_num - 1) * (dt_avg or dt)
            mfu_s = f"{mfu * 100:.2f}%" if mfu is not None else "unknown"
            print0(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, tok/s {tok_s:,.0f}, "
                   f"mfu {mfu_s}, lr {lr:.3e}, eta {int(eta // 60)}m{int(eta % 60):02d}s")
            log({"iter": iter_num, "loss": lossf, "lr": lr, "dt_ms": dt * 1000, "tok_per_s": tok_s, "mfu": mfu})
        iter_num += 1

    if wandb is not None:
        wandb.finish()
    return {"losses": losses, "val_loss": val_loss, "iter_num": iter_num}


# -----------------------------------------------------------------------------
# the pieces of train()

def open_source(cfg, data_path: str, meta: dict, layout: Layout):
    """The data.Source of the program: dialogues, document streams or random windows."""
    if isinstance(cfg, DialogConfig):
        return Dialogs(data_path, layout, cfg.seed, cfg.eval_iters, cfg.dialog_slots, cfg.block_size,
                       (cfg.vocab_prune_every, cfg.vocab_min_count, cfg.vocab_capacity))
    if cfg.loader == "docs":
        return DocStreams(data_path, meta, layout, cfg.seed, cfg.eval_iters, cfg.answer_loss)
    return RandomWindows(data_path, meta, layout, cfg.seed, cfg.eval_iters)


def init_model(cfg, source, meta: dict, ckpt: dict | None):
    """The model to train, unwrapped, on the CPU: from the checkpoint (ckpt), from scratch, or pretrained."""
    if ckpt is not None:
        check_resumable(cfg, ckpt, meta)
        # training choices, not shape: the chatbot's truncation; a GPT's context (checked by check_resumable)
        # and how its memories are searched, mixed and trained
        if isinstance(cfg, DialogConfig):
            return model_from_checkpoint(ckpt, dropout=cfg.dropout, mnm_tbptt=cfg.mnm_tbptt)
        choices = {k: getattr(cfg, k) for k in cfg.RESUME_CHOICES}
        changed = [f"{k} {ckpt['memory_args'][k]} -> {v}" for k, v in choices.items()
                   if k in ckpt["memory_args"] and ckpt["memory_args"][k] != v]
        if changed:
            print0("resuming with other memory settings than the checkpoint's: " + ", ".join(changed))
        return model_from_checkpoint(ckpt, memory=choices, dropout=cfg.dropout, block_size=cfg.block_size)
    if cfg.init_from == "scratch":
        return cfg.new_model(source.vocab_size)
    model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)  # GPT-2 or the Llama family
    want = pretrained_tokenizer_meta(cfg.init_from, model)
    if meta["tokenizer"] != want["tokenizer"] or meta.get("tokenizer_name", want.get("tokenizer_name")) != want.get("tokenizer_name"):
        hint = "gpt2" if want["tokenizer"] == "gpt2" else want["tokenizer_name"]
        raise DataError(f"init_from={cfg.init_from!r} reads its own tokens, but {cfg.data_dir}/{cfg.dataset} was "
                        f"prepared with the {meta['tokenizer']!r} tokenizer: prepare it with --tokenizer {hint}")
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    try:
        return attach_memories(model, cfg.memory_config())  # e.g. a memorizing layer on pretrained weights
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_resumable(cfg, ckpt: dict, meta: dict):
    """Refuse a checkpoint of another program or shape, or of another tokenizer."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    saved = {**ckpt["memory_args"], **ckpt["model_args"]}
    if (saved.get("model_type") == "seq2seq") != isinstance(cfg, DialogConfig):
        raise ConfigError(f"cannot resume {path} with task={cfg.task!r}: it holds a "
                          f"{saved.get('model_type', 'gpt')} model; use the task it was trained with")
    defaults = {f.name: f.default for f in fields(cfg)}
    clash = {k: (saved.get(k, defaults[k]), getattr(cfg, k)) for k in cfg.shape_keys(saved)
             if saved.get(k, defaults[k]) != getattr(cfg, k)}
    if clash:
        raise ConfigError(f"cannot resume {path}: the settings change the model's shape "
                          + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in clash.items())
                          + "; use the settings it was trained with")
    check_meta_compatible(ckpt["meta"], meta)


def restore(ckpt: dict, optimizer, scaler, source, layout: Layout):
    """Put back the optimizer, the scaler, the source's state and this rank's RNG; returns
    (iteration, best val loss)."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    source.load_state_dict(ckpt)
    states = ckpt["rng"]
    if len(states) == layout.world_size:
        set_rng_state(states[layout.rank])
    else:
        print0(f"warning: checkpoint holds RNG states of {len(states)} process(es), this run has "
               f"{layout.world_size}: dropout draws will differ from an uninterrupted run")
    return ckpt["iter_num"], ckpt["best_val_loss"]


def save_checkpoint(path, cfg, model, optimizer, scaler, source, meta, iter_num, best_val_loss):
    """Everything an exact resume needs, written atomically by rank 0 (every rank calls this)."""
    rng = source.layout.gather(get_rng_state())
    state = source.state_dict()  # e.g. every rank's memory rows
    if source.layout.rank != 0:
        return
    atomic_save({
        "model": model.state_dict(),
        "model_args": model_args(model),
        "memory_args": memory_args(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "config": asdict(cfg),
        "meta": meta,
        "rng": rng,
        "vocab": None,  # Dialogs: the elastic vocabulary, from state
        # batches are a pure function of (seed, iteration): this is the sampler's whole state
        "sampler": {"seed": cfg.seed, "next_iter": iter_num, "loader": source.name},
        **state,
    }, path)
    print0(f"saved checkpoint to {path}")


def wrap(model, cfg, layout: Layout):
    """The model the training step calls: compiled (cfg.compile) and wrapped by DDP (several processes)."""
    if cfg.compile:
        print0("compiling the model...")
        model = torch.compile(model)
    if layout.ddp:
        model = DDP(model, device_ids=[layout.device] if layout.device.startswith("cuda") else None)
    return model


def start_wandb(cfg):
    import wandb
    wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))
    return wandb


def plot_losses(metrics_path: str, png_path: str):
    """Training and validation loss against iteration, from metrics.jsonl (malformed lines skipped)."""
    plt = pyplot()
    records = read_metrics(metrics_path, strict=False)
    train_curve = [(m["iter"], m["loss"]) for m in records if "loss" in m]
    evals = [(m["iter"], m["val_loss"]) for m in records if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_curve:
        ax.plot(*zip(*train_curve), label="train (logged iterations)", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, png_path)


if __name__ == "__main__":
    cli(main, load_settings, (ConfigError, DataError, CheckpointError, OutDirError, FloatingPointError))
