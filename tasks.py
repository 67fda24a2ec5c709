"""
Training beyond the language model, run by train.py when `task` is not 'lm':

    python train.py config/train_dnc_copy.py           # DNC vs an LSTM of the same size on copy
    python train.py config/train_dnc_repeat_copy.py    # the DNC reference's task and settings
    python train.py config/train_dnc_assoc_recall.py
    python train.py config/train_pmnist_mlp.py --data_dir=../shared/data   # continual learning
    python train.py config/train_lm_sequence.py        # a GPT trained on one corpus after another

Algorithmic tasks ('copy', 'repeat_copy', 'assoc_recall'): batches of random bit patterns,
a pure function of (seed, iteration), so a resumed run sees the batches it would have seen.
The DNC and, with `baseline`, an LSTM with as many parameters train on the same batches;
the score is bits wrong per sequence on a fixed evaluation set (outputs thresholded at 0.5).
Writes metrics.jsonl, results.json, bits.png and ckpt.pt to out_dir.

Continual learning ('pmnist', 'lm_sequence'): tasks come one after another, max_iters
iterations each. Every method in `methods` starts from the same initial weights and sees the
same batches: 'finetune' just keeps training, 'ewc' adds elastic weight consolidation,
'replay' mixes stored examples of earlier tasks into every batch (ReplayBuffer).
After each task every task is evaluated; results.json holds the whole matrix and
continual.png plots the last row and the running average.
"""

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from checkpoint import load_checkpoint
from common import atomic_save, get_lr, pyplot, resolve_device, save_figure, write_json
from configurator import ConfigError, at_least, format_config, need, one_of
from data import get_batch
from dnc import DNC, DNCConfig
from model import GPT, GPTConfig
from prepare import DataError, check_meta_compatible, load_meta, open_split
from runs import MetricsLog, RunConfig, check_init_from, prepare_out_dir

ALGORITHMIC = ("copy", "repeat_copy", "assoc_recall")
CONTINUAL = ("pmnist", "lm_sequence")
TASKS = ALGORITHMIC + CONTINUAL
METHODS = ("finetune", "ewc", "replay")


@dataclass
class TaskConfig(RunConfig):
    """The settings of tasks.py's programs (train.py picks this class for these values of `task`). Of
    RunConfig's: eval_interval, eval_iters (batches of evaluation sequences) and overwrite are the
    algorithmic tasks'; max_iters counts per task in continual learning; init_from is 'scratch' or
    'resume' (algorithmic), 'scratch' (pmnist) or also GPT-2 weights (lm_sequence); the model's shape
    is lm_sequence's GPT, whose n_head and block_size (steps attended over) a 'gpt' DNC controller takes."""
    PROGRAM = f"task={' / '.join(map(repr, TASKS))}"
    task: str = "copy"  # 'copy', 'repeat_copy', 'assoc_recall' (a DNC against an LSTM of its size), 'pmnist'
    # and 'lm_sequence' (continual learning: fine-tuning, EWC and replay under one protocol)
    dtype: str = "auto"  # these programs train in float32: 'auto' or 'float32'
    optimizer: str = "adamw"  # 'adamw', 'rmsprop' (the DNC reference's) or 'sgd'
    # DNC (dnc.DNCConfig)
    memory_slots: int = 16  # N
    word_size: int = 16  # W
    read_heads: int = 4  # R
    controller: str = "lstm"  # 'lstm' (the reference) or 'gpt' (a GPT block)
    hidden_size: int = 64  # controller width
    sparse_links: int = 0  # K > 0: sparse temporal links (top-K), for large memory_slots; 0: dense N x N
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

    def validate(self):
        """Refuse settings that cannot work, before any work, naming the fix."""
        need(self.task in TASKS, f"unknown task {self.task!r}; choose 'lm', 'dialog' or one of {', '.join(TASKS)}")
        super().validate()
        at_least(self, 1, "max_iters", "n_tasks", "replay_capacity", "replay_every", "replay_store", "ewc_samples")
        at_least(self, 0, "replay_batch", "ewc_lambda")
        one_of(self, "dtype", ("auto", "float32"))
        one_of(self, "optimizer", ("adamw", "rmsprop", "sgd"))
        one_of(self, "classifier", ("linear", "mlp"))
        one_of(self, "replay_policy", ("ring", "reservoir"))
        need(set(self.methods) <= set(METHODS) and len(self.methods) > 0, f"methods must be some of {METHODS}, "
             f"got {self.methods}")
        need(self.task not in CONTINUAL or self.replay_store <= min(self.batch_size, self.replay_capacity),
             f"replay_store ({self.replay_store}) must be at most batch_size ({self.batch_size}) and replay_capacity "
             f"({self.replay_capacity}): replay stores rows of the current batch")
        at_least(self, 1, "min_len", "max_len", "min_repeats", "max_repeats", "item_len")
        need(self.min_len <= self.max_len, f"need 1 <= min_len <= max_len (got min_len={self.min_len}, "
             f"max_len={self.max_len})")
        need(self.min_repeats <= self.max_repeats, f"need 1 <= min_repeats <= max_repeats (got min_repeats="
             f"{self.min_repeats}, max_repeats={self.max_repeats})")
        need(self.task != "assoc_recall" or self.min_len >= 2, "assoc_recall needs min_len >= 2 items (the query "
             "is never the last one)")
        check_dnc(self)
        if self.task in ALGORITHMIC:
            check_init_from(self.init_from, allowed=("scratch", "resume"))
        else:
            need(self.init_from != "resume", f"task {self.task!r} runs its whole protocol in one go: it cannot "
                 "resume; start it again")
            check_init_from(self.init_from, allowed=("scratch",) if self.task == "pmnist" else None)
        if self.task == "lm_sequence":
            need(len(self.datasets) >= 1, "lm_sequence needs datasets=[...]: prepared datasets in data_dir, in order")
            need("ewc" not in self.methods, "lm_sequence compares 'finetune' and 'replay'; drop 'ewc' from methods")


def check_dnc(cfg):
    """The DNC's settings (TaskConfig, bench.BenchConfig); dnc_config's own checks for an algorithmic task."""
    at_least(cfg, 1, "bits", "memory_slots", "word_size", "read_heads", "hidden_size")
    at_least(cfg, 0, "sparse_links")
    one_of(cfg, "controller", ("lstm", "gpt"))
    if cfg.task in ALGORITHMIC:
        try:
            dnc_config(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def main(cfg) -> dict:
    cfg.validate()
    need(int(os.environ.get("RANK", -1)) == -1, f"task {cfg.task!r} runs in one process: start it with "
         "python train.py, not torchrun")
    device, _ = resolve_device(cfg.device, "float32")
    # continual learning writes no checkpoint: only an algorithmic run can overwrite one
    prepare_out_dir(cfg.out_dir, cfg.task in ALGORITHMIC and cfg.init_from != "resume", cfg.overwrite)
    print(f"settings:\n{format_config(cfg)}")
    print(f"task {cfg.task} on {device}, {torch.get_num_threads()} CPU threads")
    if cfg.task in ALGORITHMIC:
        return train_algorithmic(cfg, device)
    if cfg.task == "pmnist":
        return run_pmnist(cfg, device)
    return run_lm_sequence(cfg, device)


def make_optimizer(cfg, model):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)
    if cfg.optimizer == "rmsprop":  # deepmind/dnc: TensorFlow's RMSProp, decay 0.9, epsilon 1e-10
        return torch.optim.RMSprop(model.parameters(), lr=cfg.learning_rate, alpha=0.9, eps=1e-10)
    if isinstance(model, GPT):
        device_type = next(model.parameters()).device.type
        return model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay)


def new_figure(ncols):
    plt = pyplot()
    return plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)


# -----------------------------------------------------------------------------
# algorithmic tasks: data

def task_sizes(cfg) -> tuple[int, int]:
    """(input channels, output channels) of the task's sequences."""
    return {"copy": (cfg.bits + 1, cfg.bits),  # + delimiter
            "repeat_copy": (cfg.bits + 2, cfg.bits + 1),  # + delimiter, repeat count; + end marker
            "assoc_recall": (cfg.bits + 2, cfg.bits)}[cfg.task]  # + item delimiter, query delimiter


def copy_sequence(rng, cfg):
    """L patterns, a delimiter, then the patterns back while the input is blank."""
    L, b = int(rng.integers(cfg.min_len, cfg.max_len + 1)), cfg.bits
    pattern = rng.integers(0, 2, size=(L, b))
    x, y, mask = np.zeros((2 * L + 1, b + 1)), np.zeros((2 * L + 1, b)), np.zeros(2 * L + 1)
    x[:L, :b], x[L, b] = pattern, 1
    y[L + 1:], mask[L + 1:] = pattern, 1
    return x, y, mask


def repeat_copy_sequence(rng, cfg):
    """L patterns, a delimiter carrying the repeat count (divided by max_repeats), then the
    patterns `repeats` times over and an end marker on the last step."""
    L, b = int(rng.integers(cfg.min_len, cfg.max_len + 1)), cfg.bits
    reps = int(rng.integers(cfg.min_repeats, cfg.max_repeats + 1))
    pattern = rng.integers(0, 2, size=(L, b))
    T = L + 1 + L * reps + 1
    x, y, mask = np.zeros((T, b + 2)), np.zeros((T, b + 1)), np.zeros(T)
    x[:L, :b], x[L, b], x[L, b + 1] = pattern, 1, reps / cfg.max_repeats
    y[L + 1:T - 1, :b], y[T - 1, b], mask[L + 1:] = np.tile(pattern, (reps, 1)), 1, 1
    return x, y, mask


def assoc_recall_sequence(rng, cfg):
    """n items of item_len patterns, each after an item delimiter; then a query item between two
    query delimiters; the answer is the item that followed the query in the list."""
    n, k, b = int(rng.integers(cfg.min_len, cfg.max_len + 1)), cfg.item_len, cfg.bits
    items = rng.integers(0, 2, size=(n, k, b))
    q = int(rng.integers(0, n - 1))
    T = n * (k + 1) + (k + 2) + k
    x, y, mask = np.zeros((T, b + 2)), np.zeros((T, b)), np.zeros(T)
    for i in range(n):
        x[i * (k + 1), b] = 1
        x[i * (k + 1) + 1:(i + 1) * (k + 1), :b] = items[i]
    s = n * (k + 1)
    x[s, b + 1], x[s + 1:s + 1 + k, :b], x[s + 1 + k, b + 1] = 1, items[q], 1
    y[T - k:], mask[T - k:] = items[q + 1], 1
    return x, y, mask


SEQUENCES = {"copy": copy_sequence, "repeat_copy": repeat_copy_sequence, "assoc_recall": assoc_recall_sequence}


def make_batch(cfg, rng, batch_size, device="cpu"):
    """x (B, T, in), y (B, T, out), mask (B, T): sequences padded to the longest, padding masked."""
    seqs = [SEQUENCES[cfg.task](rng, cfg) for _ in range(batch_size)]
    T = max(len(m) for _, _, m in seqs)
    x = np.zeros((batch_size, T, seqs[0][0].shape[1]), dtype=np.float32)
    y = np.zeros((batch_size, T, seqs[0][1].shape[1]), dtype=np.float32)
    mask = np.zeros((batch_size, T), dtype=np.float32)
    for i, (xs, ys, ms) in enumerate(seqs):
        x[i, :len(ms)], y[i, :len(ms)], mask[i, :len(ms)] = xs, ys, ms
    return tuple(torch.from_numpy(a).to(device) for a in (x, y, mask))


def masked_bce(logits, y, mask):
    """Sigmoid cross-entropy summed over bits and (masked) time, averaged over sequences: the
    reference's loss."""
    per_bit = F.binary_cross_entropy_with_logits(logits, y, reduction="none")  # (B, T, out)
    return (per_bit * mask[:, :, None]).sum() / y.size(0)


def bits_wrong(logits, y, mask):
    """Bits wrong per sequence (B,), outputs thresholded at probability 0.5."""
    return (((logits > 0) != (y > 0.5)) * mask[:, :, None]).sum(dim=(1, 2))


# -----------------------------------------------------------------------------
# algorithmic tasks: models and training

class LSTMBaseline(nn.Module):
    """One LSTM layer and a linear read-out; returns (y, state) like the DNC."""

    def __init__(self, input_size: int, output_size: int, hidden_size: int):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.out = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        h, state = self.lstm(x)
        return self.out(h), state


def matched_lstm_hidden(input_size: int, output_size: int, n_params: int) -> int:
    """The hidden size whose LSTMBaseline has the parameter count closest to n_params:
    4h(in + h) + 8h weights and biases, plus (h + 1) out."""
    count = lambda h: 4 * h * (input_size + h) + 8 * h + (h + 1) * output_size
    return min(range(1, 4096), key=lambda h: abs(count(h) - n_params))


def dnc_config(cfg) -> DNCConfig:
    input_size, output_size = task_sizes(cfg)
    return DNCConfig(input_size, output_size, memory_slots=cfg.memory_slots, word_size=cfg.word_size,
                     read_heads=cfg.read_heads, controller=cfg.controller, hidden_size=cfg.hidden_size,
                     n_head=cfg.n_head, window=cfg.block_size, sparse_links=cfg.sparse_links)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train_algorithmic(cfg, device) -> dict:
    """Returns {'losses': {model: {iter: loss}}, 'bits_wrong': {model: final bits per sequence},
    'params': {model: count}, 'iter_num': ...}."""
    models, model_args = algorithmic_models(cfg, device)
    optimizers = {name: make_optimizer(cfg, m) for name, m in models.items()}
    params = {name: n_params(m) for name, m in models.items()}
    print("models: " + ", ".join(f"{name} {count:,} parameters" for name, count in params.items()))
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    iter_num, train_time = 0, {name: 0.0 for name in models}
    if cfg.init_from == "resume":
        iter_num, train_time = resume_algorithmic(ckpt_path, models, optimizers, model_args)
    if cfg.compile:  # the DNC's step is where the time goes: compiling it fuses its many small operations
        models["dnc"].step = torch.compile(models["dnc"].step)
    eval_set = [make_batch(cfg, np.random.default_rng([cfg.seed, 1, k]), cfg.batch_size, device)
                for k in range(cfg.eval_iters)]
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), iter_num if cfg.init_from == "resume" else None)
    history = [r for r in log.kept if "bits" in r]
    losses, start = {name: {} for name in models}, iter_num
    while True:
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            record = {"iter": iter_num, "bits": {name: bits_wrong_on(m, eval_set) for name, m in models.items()},
                      "train_time_s": dict(train_time)}
            history.append(record)
            log(record)
            print(f"step {iter_num}: bits wrong per sequence " + ", ".join(
                f"{name} {record['bits'][name]:.4f} ({train_time[name]:.0f}s)" for name in models))
            if iter_num > start:
                atomic_save({"model": {n: m.state_dict() for n, m in models.items()}, "model_args": model_args,
                             "optimizer": {n: o.state_dict() for n, o in optimizers.items()},
                             "iter_num": iter_num, "train_time": train_time, "config": asdict(cfg)}, ckpt_path)
        if iter_num >= cfg.max_iters:
            break
        lr = get_lr(iter_num, cfg)
        batch = make_batch(cfg, np.random.default_rng([cfg.seed, 0, iter_num]), cfg.batch_size, device)
        for name, model in models.items():
            loss = algorithmic_step(cfg, model, optimizers[name], batch, lr, train_time, name)
            if iter_num % cfg.log_interval == 0:
                losses[name][iter_num] = loss
        if iter_num % cfg.log_interval == 0:
            print(f"iter {iter_num}: loss " + ", ".join(f"{n} {l[iter_num]:.4f}" for n, l in losses.items()))
            log({"iter": iter_num, "loss": {n: l[iter_num] for n, l in losses.items()}, "lr": lr})
        iter_num += 1
    return report_algorithmic(cfg, history, params, losses, iter_num)


def algorithmic_models(cfg, device):
    """({'dnc': the DNC, 'lstm': the baseline of its parameter count (cfg.baseline)}, their arguments)."""
    torch.manual_seed(cfg.seed)
    dcfg = dnc_config(cfg)
    models = {"dnc": DNC(dcfg)}
    hidden = matched_lstm_hidden(dcfg.input_size, dcfg.output_size, n_params(models["dnc"]))
    if cfg.baseline:
        models["lstm"] = LSTMBaseline(dcfg.input_size, dcfg.output_size, hidden)
    for m in models.values():
        m.to(device)
    return models, {"dnc": asdict(dcfg), "lstm_hidden": hidden if cfg.baseline else None}


def resume_algorithmic(ckpt_path, models, optimizers, model_args):
    """Load the models and optimizers from ckpt_path; returns (iteration, training time per model)."""
    ckpt = load_checkpoint(ckpt_path)
    if ckpt["model_args"] != model_args:
        raise ConfigError(f"cannot resume {ckpt_path}: it holds models {ckpt['model_args']}, these settings "
                          f"make {model_args}; use the settings it was trained with")
    for name in models:
        models[name].load_state_dict(ckpt["model"][name])
        optimizers[name].load_state_dict(ckpt["optimizer"][name])
    print(f"resuming from {ckpt_path} at iteration {ckpt['iter_num']}")
    return ckpt["iter_num"], ckpt["train_time"]


@torch.no_grad()
def bits_wrong_on(model, eval_set) -> float:
    """Mean bits wrong per sequence over the evaluation batches."""
    model.eval()
    wrong = torch.cat([bits_wrong(model(x)[0], y, mask) for x, y, mask in eval_set])
    model.train()
    return wrong.mean().item()


def algorithmic_step(cfg, model, optimizer, batch, lr, train_time, name) -> float:
    """One optimizer step of one model on a batch, its time added to train_time[name]; returns the loss."""
    x, y, mask = batch
    t0 = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = masked_bce(model(x)[0], y, mask)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()  # count the GPU's time, not only the launches
    train_time[name] += time.perf_counter() - t0
    return loss.item()


def report_algorithmic(cfg, history, params, losses, iter_num) -> dict:
    """Write results.json and bits.png; returns train_algorithmic's result."""
    # the first evaluation below 0.01 bits per sequence, with the training time it took
    target = {name: next(({"iter": h["iter"], "train_time_s": h["train_time_s"][name]}
                          for h in history if h["bits"][name] < 0.01), None) for name in params}
    final = history[-1]
    result = {"task": cfg.task, "params": params, "bits_wrong": final["bits"], "train_time_s": final["train_time_s"],
              "below_0.01_bits": target, "eval_sequences": cfg.eval_iters * cfg.batch_size,
              "iter_num": iter_num, "history": history, "settings": asdict(cfg)}
    write_json(os.path.join(cfg.out_dir, "results.json"), result)
    fig, axes = new_figure(1)
    ax = axes[0][0]
    for name in params:
        ax.plot([h["train_time_s"][name] for h in history], [max(h["bits"][name], 1e-3) for h in history],
                "o-", ms=3, label=f"{name} ({params[name]:,} parameters)")
    ax.set(xlabel="training time (s)", ylabel="bits wrong per sequence", yscale="log", title=cfg.task)
    ax.axhline(0.01, color="gray", lw=0.8, ls="--")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, os.path.join(cfg.out_dir, "bits.png"))
    print("final bits wrong per sequence: " + ", ".join(
        f"{n} {b:.4f} after {final['train_time_s'][n]:.0f}s" for n, b in final["bits"].items()))
    return {"losses": losses, "bits_wrong": final["bits"], "params": params, "iter_num": iter_num,
            "below_0.01_bits": target}


# -----------------------------------------------------------------------------
# continual learning: EWC and the shared protocol

class ReplayBuffer:
    """Up to `capacity` stored examples, each a row of one or more tensors (say an image and its
    label), kept on the device they arrive on.

    policy 'ring': the newest examples overwrite the oldest. 'reservoir' (Vitter's algorithm R):
    after n examples were offered, each of them is in the buffer with the same probability
    capacity / n, so old tasks keep their share. sample(n) draws uniformly, with replacement,
    from the filled slots only: an unfilled slot is never returned."""

    def __init__(self, capacity: int, policy: str = "ring", seed: int = 0):
        if capacity < 1 or policy not in ("ring", "reservoir"):
            raise ValueError(f"ReplayBuffer needs capacity >= 1 and policy 'ring' or 'reservoir', "
                             f"got {capacity}, {policy!r}")
        self.capacity, self.policy = capacity, policy
        self.slots = None  # one (capacity, ...) tensor per field, allocated by the first add
        self.filled = 0  # slots 0..filled-1 hold examples
        self.seen = 0  # examples offered so far
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return self.filled

    def add(self, *rows):
        """Offer examples: tensors with the same number of rows, the same fields every call."""
        n = rows[0].size(0)
        if self.slots is None:
            self.slots = [torch.zeros((self.capacity, *r.shape[1:]), dtype=r.dtype, device=r.device) for r in rows]
        if len(rows) != len(self.slots) or any(r.size(0) != n or r.shape[1:] != s.shape[1:] or r.dtype != s.dtype
                                               for r, s in zip(rows, self.slots)):
            raise ValueError("ReplayBuffer.add: every call must give the same fields, each with rows of the "
                             f"stored shape and dtype ({[(tuple(s.shape[1:]), s.dtype) for s in self.slots]})")
        for i in range(n):  # one at a time: a later example may replace an earlier one of the same call
            if self.policy == "ring":
                dest = self.seen % self.capacity
            else:
                dest = self.seen if self.seen < self.capacity else int(self.rng.integers(0, self.seen + 1))
            if dest < self.capacity:
                for s, r in zip(self.slots, rows):
                    s[dest] = r[i]
            self.seen += 1
        self.filled = min(self.capacity, self.seen)

    def sample(self, n: int):
        """n stored examples drawn uniformly from the filled slots: a tuple of (n, ...) tensors."""
        if self.filled == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty; add examples first")
        idx = torch.from_numpy(self.rng.integers(0, self.filled, size=n)).to(self.slots[0].device)
        return tuple(s[idx] for s in self.slots)


def fisher_diagonal(model, loss_fn, inputs, generator=None, chunk_size=128) -> dict:
    """Diagonal Fisher information, E[(d log p(y|x) / d theta)^2] over inputs with y drawn from the
    model's own prediction (the Fisher itself, not the 'empirical' one with the true labels).
    loss_fn(logits, y) -> per-example negative log-likelihood."""
    from torch.func import functional_call, grad, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        y = torch.multinomial(torch.softmax(model(inputs), dim=-1), 1, generator=generator)[:, 0]

    def one(p, x, t):
        return loss_fn(functional_call(model, p, (x[None],)), t[None]).sum()

    grads = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, inputs, y)
    return {k: g.pow(2).mean(0) for k, g in grads.items()}


class EWC:
    """Elastic weight consolidation (Kirkpatrick et al., PNAS 2017): after task t, a penalty
    lambda/2 sum_i F_t,i (theta_i - theta*_t,i)^2. The penalties of all past tasks add up to one
    quadratic, kept as A = sum F_t, B = sum F_t theta*_t, C = sum F_t theta*_t^2, so a step costs
    the same however many tasks came before."""

    def __init__(self, lam: float):
        self.lam = lam
        self.terms = {}  # parameter name -> (A, B, C)

    def consolidate(self, model, fisher: dict):
        for name, p in model.named_parameters():
            f, theta = fisher[name], p.detach()
            a, b, c = self.terms.get(name, (0.0, 0.0, 0.0))
            self.terms[name] = (a + f, b + f * theta, c + f * theta * theta)

    def penalty(self, model):
        if not self.terms:
            return 0.0
        total = sum(((a * p - 2 * b) * p + c).sum() for name, p in model.named_parameters()
                    for a, b, c in [self.terms[name]])
        return 0.5 * self.lam * total


def run_continual(cfg, n_tasks, build, batch, loss_fn, evaluate, fisher=None) -> dict:
    """Train every method in cfg.methods through tasks 0..n_tasks-1, max_iters iterations each.
    build() -> model; batch(task, it) -> tuple of tensors, rows first; loss_fn(model, *batch);
    evaluate(model, task) -> score; fisher(model, task) -> diagonal Fisher (for 'ewc').
    Returns {method: {'matrix': [[score of task j after training task i]], 'time_s': ...}}."""
    results = {}
    for method in cfg.methods:
        torch.manual_seed(cfg.seed)  # every method starts from the same weights
        model = build()
        optimizer = make_optimizer(cfg, model)
        buffer = ReplayBuffer(cfg.replay_capacity, cfg.replay_policy, seed=cfg.seed) if method == "replay" else None
        ewc = EWC(cfg.ewc_lambda) if method == "ewc" else None
        matrix, t0 = [], time.time()
        for task in range(n_tasks):
            model.train()
            for it in range(cfg.max_iters):
                for group in optimizer.param_groups:
                    group["lr"] = get_lr(it, cfg)
                rows = batch(task, it)
                if buffer is not None:
                    stored = buffer.sample(cfg.replay_batch) if len(buffer) and cfg.replay_batch else None
                    if it % cfg.replay_every == 0:
                        buffer.add(*(r[:cfg.replay_store] for r in rows))
                    if stored is not None:  # stored examples join the batch
                        rows = tuple(torch.cat([r, s]) for r, s in zip(rows, stored))
                loss = loss_fn(model, *rows)
                if ewc is not None:
                    loss = loss + ewc.penalty(model)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if it % cfg.log_interval == 0:
                    print(f"{method} task {task} iter {it}: loss {loss.item():.4f}")
            model.eval()
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise FloatingPointError(f"{method}: the weights diverged during task {task}; lower learning_rate"
                                         + (" or ewc_lambda (lr * lambda * Fisher must stay well below 2)"
                                            if ewc is not None else ""))
            if ewc is not None:
                ewc.consolidate(model, fisher(model, task))
            with torch.no_grad():
                matrix.append([evaluate(model, j) for j in range(n_tasks)])
            seen = matrix[-1][:task + 1]
            print(f"{method} after task {task}: mean over tasks so far {np.mean(seen):.4f}, "
                  f"per task {' '.join(f'{s:.3f}' for s in seen)}")
        results[method] = {"matrix": matrix, "time_s": time.time() - t0,
                           "stored": len(buffer) if buffer is not None else 0}
    return results


def summarise(results, n_tasks) -> dict:
    """Adds 'final' (every task's score after the last task) and 'running_average' (mean over the
    tasks seen so far, after each task) to each method's results."""
    for r in results.values():
        r["final"] = r["matrix"][-1]
        r["running_average"] = [float(np.mean(row[:i + 1])) for i, row in enumerate(r["matrix"])]
    return results


def report_continual(cfg, results, n_tasks, score_name, extra, names=None) -> dict:
    """Prints the table, writes results.json and continual.png (tasks labelled by `names` if given)."""
    summarise(results, n_tasks)
    print(f"\n{score_name} on every task after the last task (task 0 first), and their mean")
    for method, r in results.items():
        print(f"{method:>9}: mean {r['running_average'][-1]:.4f} | " + " ".join(f"{s:.3f}" for s in r["final"]))
    out = {"task": cfg.task, "score": score_name, "n_tasks": n_tasks, "methods": results, **extra,
           "settings": asdict(cfg)}
    write_json(os.path.join(cfg.out_dir, "results.json"), out)
    fig, axes = new_figure(2)
    left, right = axes[0]
    for method, r in results.items():
        left.plot(range(n_tasks), r["final"], "o-", ms=3, label=method)
        right.plot(range(1, n_tasks + 1), r["running_average"], "o-", ms=3, label=method)
    left.set(xlabel="task", ylabel=score_name, title=f"after the last of {n_tasks} tasks")
    right.set(xlabel="tasks trained", ylabel=f"mean {score_name} over tasks so far", title="running average")
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
        ax.grid(alpha=0.3)
    if names:
        left.set_xticks(range(n_tasks), names)
        right.set_xticks(range(1, n_tasks + 1), [f"+{name}" for name in names])
    save_figure(fig, os.path.join(cfg.out_dir, "continual.png"))
    print(f"wrote {cfg.out_dir}/results.json and continual.png")
    return out


# -----------------------------------------------------------------------------
# permuted MNIST

MNIST_HF = "ylecun/mnist"
MNIST_OFFLINE_TEST_FRAC = 0.2  # with only the 10,000 test digits at hand, this share is each task's test part


def read_idx(path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, optionally gzipped) as a uint8 array."""
    import gzip
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex()}); "
                        "expected MNIST's t10k-images-idx3-ubyte(.gz) / t10k-labels-idx1-ubyte(.gz)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"{path} holds {len(body)} bytes of data, its header says {dims}: truncated? "
                        "fetch the file again")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _idx_pair(folder: Path, prefix: str):
    """(images, labels) from folder/{prefix}-images-idx3-ubyte[.gz] and labels, or None."""
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        paths = [folder / f"{prefix}-{kind}-ubyte{ext}" for ext in ("", ".gz")]
        path = next((p for p in paths if p.is_file()), None)
        if path is None:
            return None
        found.append(read_idx(path))
    images, labels = found
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} {prefix} images but {len(labels)} labels")
    return images.reshape(len(images), -1), labels.astype(np.int64)


def load_mnist(data_dir, seed):
    """(x_train, y_train, x_test, y_test, source): images as (n, 784) uint8. From IDX files in
    data_dir/mnist (the official split when the training files are there too; with the test
    files alone, a seeded split of those 10,000 digits), else from Hugging Face."""
    folder = Path(data_dir) / "mnist"
    test = _idx_pair(folder, "t10k")
    if test is not None:
        train = _idx_pair(folder, "train")
        if train is not None:
            return (*train, *test, f"{folder} (official train/test split)")
        x, y = test
        order = np.random.default_rng(seed).permutation(len(x))
        n_test = int(len(x) * MNIST_OFFLINE_TEST_FRAC)
        return (x[order[n_test:]], y[order[n_test:]], x[order[:n_test]], y[order[:n_test]],
                f"{folder} (MNIST test set split {len(x) - n_test}/{n_test})")
    print(f"no IDX files in {folder}; loading MNIST from Hugging Face ({MNIST_HF})")
    try:
        import datasets
        ds = datasets.load_dataset(MNIST_HF)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"no MNIST IDX files in {folder} and Hugging Face failed ({first}); offline, pass "
                        f"--data_dir=../shared/data (its mnist/ holds t10k-images-idx3-ubyte.gz)") from None
    arrays = []
    for split in ("train", "test"):
        arrays.append(np.stack([np.asarray(im, dtype=np.uint8).reshape(-1) for im in ds[split]["image"]]))
        arrays.append(np.asarray(ds[split]["label"], dtype=np.int64))
    return (*arrays, f"https://huggingface.co/datasets/{MNIST_HF}")


def classifier(kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(784, 10)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def run_pmnist(cfg, device) -> dict:
    """Permuted MNIST: task t sees every image's pixels in its own fixed random order (task 0
    keeps the original order). Returns the dict written to results.json."""
    x_train, y_train, x_test, y_test, source = load_mnist(cfg.data_dir, cfg.seed)
    print(f"MNIST from {source}: {len(x_train)} training and {len(x_test)} test digits per task")
    x_train = torch.from_numpy(x_train).float().div(255).to(device)
    x_test = torch.from_numpy(x_test).float().div(255).to(device)
    y_train, y_test = torch.from_numpy(y_train).to(device), torch.from_numpy(y_test).to(device)
    perms = [torch.arange(784)] + [torch.from_numpy(np.random.default_rng([cfg.seed, 5, t]).permutation(784))
                                   for t in range(1, cfg.n_tasks)]
    perms = [p.to(device) for p in perms]

    def batch(task, it):
        rows = torch.from_numpy(np.random.default_rng([cfg.seed, 0, task, it]).integers(0, len(x_train), cfg.batch_size))
        rows = rows.to(device)
        return x_train[rows][:, perms[task]], y_train[rows]

    def loss_fn(model, x, y):
        return F.cross_entropy(model(x), y)

    def evaluate(model, task):
        return (model(x_test[:, perms[task]]).argmax(-1) == y_test).float().mean().item()

    def fisher(model, task):
        rows = torch.from_numpy(np.random.default_rng([cfg.seed, 4, task]).integers(0, len(x_train), cfg.ewc_samples))
        gen = torch.Generator(device=device).manual_seed(cfg.seed + task)
        nll = lambda logits, y: F.cross_entropy(logits, y, reduction="none")
        return fisher_diagonal(model, nll, x_train[rows.to(device)][:, perms[task]], gen)

    results = run_continual(cfg, cfg.n_tasks, lambda: classifier(cfg.classifier).to(device), batch, loss_fn,
                            evaluate, fisher)
    return report_continual(cfg, results, cfg.n_tasks, "accuracy", {"data": source, "classifier": cfg.classifier})


# -----------------------------------------------------------------------------
# a language model trained on one corpus after another

def run_lm_sequence(cfg, device) -> dict:
    """Forgetting in language models: the validation loss on every corpus after training on each
    in turn. Returns the dict written to results.json."""
    paths = [os.path.join(cfg.data_dir, name) for name in cfg.datasets]
    metas = [load_meta(p) for p in paths]
    for meta in metas[1:]:
        check_meta_compatible(metas[0], meta)
    splits = [{s: open_split(p, s, m) for s in ("train", "val")} for p, m in zip(paths, metas)]
    vocab = max(m["vocab_size"] for m in metas)

    def build():
        if cfg.init_from == "scratch":
            model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer,
                                  n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
        else:
            if metas[0]["tokenizer"] != "gpt2":
                raise DataError(f"init_from={cfg.init_from!r} needs datasets prepared with --tokenizer gpt2")
            model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
            model.crop_block_size(min(cfg.block_size, model.config.block_size))
        return model.to(device)

    def windows(task, split, rng, n):
        data = splits[task][split]
        if len(data) <= cfg.block_size:
            raise DataError(f"{paths[task]} {split} split has {len(data)} tokens, fewer than block_size + 1")
        return get_batch(data, rng.integers(0, len(data) - cfg.block_size, size=n), cfg.block_size, device)

    def batch(task, it):
        return windows(task, "train", np.random.default_rng([cfg.seed, 0, task, it]), cfg.batch_size)

    def loss_fn(model, x, y):
        return model(x, y)[1]

    def evaluate(model, task):
        rng = np.random.default_rng([cfg.seed, 2, task])
        return float(np.mean([loss_fn(model, *windows(task, "val", rng, cfg.batch_size)).item()
                              for _ in range(cfg.eval_iters)]))

    results = run_continual(cfg, len(paths), build, batch, loss_fn, evaluate)
    return report_continual(cfg, results, len(paths), "val loss", {"datasets": cfg.datasets}, names=cfg.datasets)
