"""
Training runs, for train.py and tasks.py: the settings every training program shares
(RunConfig, which train.TrainConfig, train.DialogConfig and tasks.TaskConfig extend), where a run
may start from (init_from), and its folder (out_dir): what a new run refuses to overwrite, the
leftovers of a killed run, and metrics.jsonl, the run's log of one JSON object a line.

Nothing is lost: a run started from scratch refuses an out_dir holding a checkpoint unless
told to overwrite it; a resumed run rewrites metrics.jsonl atomically with the lines before its
first iteration; every record is appended as one line, flushed and fsynced, so a killed run
leaves at most a torn last line, which the next resume drops with a warning.
"""

import difflib
import json
import os
import re
from dataclasses import dataclass

import model
from common import atomic_write, remove_stale_temps
from configurator import ConfigError, above, at_least, need, within
from knn import KNNSettings
from prepare import SPECIALS

# names from_pretrained takes from the Hugging Face hub (or its cache), by prefix
HUB_PREFIXES = ("gpt2", "openai-community/gpt2", "HuggingFaceTB/")


@dataclass
class RunConfig:
    """What every training program reads: its folder, evaluation and logging, the model's shape,
    the optimizer's step and schedule (common.get_lr), the device."""
    # I/O
    out_dir: str = "out"
    eval_interval: int = 250
    log_interval: int = 10
    eval_iters: int = 20
    init_from: str = "scratch"  # 'scratch', 'resume' (from out_dir), 'gpt2*', or a local HF GPT-2 folder
    overwrite: bool = False  # True: a new run (init_from not 'resume') may replace out_dir's ckpt.pt
    data_dir: str = "data"
    batch_size: int = 12  # rows per (micro-)step, per process
    # model (ignored when resuming or fine-tuning: the checkpoint's shape wins)
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True
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
    compile: bool = False  # torch.compile the model (worth it on GPU for long runs)
    seed: int = 1337

    def validate(self):
        check_shape_and_device(self)
        at_least(self, 1, "eval_interval", "log_interval", "eval_iters", "batch_size")
        at_least(self, 0, "max_iters", "weight_decay", "grad_clip", "warmup_iters", "lr_decay_iters", "min_lr", "seed")
        above(self, 0, "learning_rate")
        within(self, 0, 1, "dropout", "beta1", "beta2")


def check_shape_and_device(cfg):
    """A GPT's shape (n_layer, n_head, n_embd, block_size) and the device (RunConfig, bench.BenchConfig)."""
    at_least(cfg, 1, "block_size", "n_layer", "n_head", "n_embd")
    need(cfg.n_embd % cfg.n_head == 0, f"n_embd={cfg.n_embd} is not a multiple of n_head={cfg.n_head}: "
         "n_embd must be n_head times the head size")
    need(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device) is not None,
         f"device={cfg.device!r} is not allowed: device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


class OutDirError(RuntimeError):
    """out_dir holds something a run cannot use as asked; the message says what to do."""


def check_init_from(init_from: str, allowed=None, name: str = "init_from"):
    """init_from must be 'scratch', 'resume', a hub name (HUB_PREFIXES), a registered short name
    (model.PACKAGED_GGUF, where the model has them), a local folder or a .gguf file; `allowed`
    narrows it to those names (a program that cannot start from pretrained weights); name: the setting's."""
    short = tuple(getattr(model, "PACKAGED_GGUF", {}))
    names = ("scratch", "resume") + short
    if allowed is not None:
        ok = init_from in allowed
        choices = " or ".join(map(repr, allowed))
    else:
        ok = (init_from in names or init_from.startswith(HUB_PREFIXES) or os.path.isdir(init_from)
              or (init_from.endswith(".gguf") and os.path.isfile(init_from)))
        choices = (f"{', '.join(map(repr, names))}, a pretrained model name ({', '.join(p + '...' for p in HUB_PREFIXES)}), "
                   "a local folder written by save_pretrained, or a .gguf file")
    if not ok:
        close = difflib.get_close_matches(init_from, allowed or names, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{name}={init_from!r} is not {choices}{hint}")


def prepare_out_dir(out_dir: str, new_run: bool, overwrite: bool, master: bool = True):
    """Before a run writes anything (called by every process, so that all stop alike): refuse to start
    a new run (one that writes ckpt.pt, not resuming) over a checkpoint unless overwrite, refuse to
    resume over a metrics.jsonl that cannot be read; then (on the master process) make out_dir and
    remove the temp files a killed run left."""
    if new_run and os.path.exists(os.path.join(out_dir, "ckpt.pt")) and not overwrite:
        raise ConfigError(f"{out_dir} already holds a checkpoint (ckpt.pt), which a new run would overwrite: "
                          "continue it with --init_from=resume, choose another --out_dir, or pass "
                          "--overwrite=True to replace it")
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if not new_run and os.path.exists(metrics):
        read_metrics(metrics, warn=False)
    if not master:
        return
    os.makedirs(out_dir, exist_ok=True)
    for tmp, _ in remove_stale_temps(out_dir):
        print(f"note: removed {tmp}, left by a run that was stopped while writing")


def read_metrics(path: str, strict: bool = True, warn: bool = True) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (a run killed mid-write) is dropped, with a
    warning (warn); a malformed line elsewhere is an OutDirError naming it (strict) or skipped (not
    strict, for plots)."""
    with open(path) as f:
        lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
    records = []
    for n, line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
                raise ValueError("not a record with an integer 'iter'")
        except ValueError as e:
            if n == lines[-1][0]:
                if warn:
                    print(f"warning: dropped the torn last line {n} of {path} (a run stopped while writing it)")
            elif strict:
                raise OutDirError(f"{path} line {n} is not a metrics record ({e}): {line.strip()[:80]!r}; "
                                  "delete or mend that line, or start a new out_dir") from None
            continue
        records.append(record)
    return records


class MetricsLog:
    """metrics.jsonl, written by the master process only. A resumed run (start_iter set) keeps the
    records of the iterations before start_iter, rewritten atomically; a new run starts it empty.
    Each record is then appended as one line, flushed and fsynced. `also(record)`: another logger.
    kept: the records kept from before."""

    def __init__(self, path: str, start_iter: int | None, master: bool = True, also=None):
        self.path, self.master, self.also, self.kept = path, master, also, []
        if not master:
            return
        if start_iter is not None and os.path.exists(path):
            self.kept = [r for r in read_metrics(path) if r["iter"] < start_iter]
        atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in self.kept), "w")

    def __call__(self, record: dict):
        if not self.master:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.also is not None:
            self.also(record)


# -----------------------------------------------------------------------------
# sample.py's and evaluate.py's shared settings

def not_empty(cfg, *names):
    """A path or text setting is something, or None (off): never the empty string a bare --key= gives."""
    for name in names:
        need(getattr(cfg, name) != "", f"{name}='' is empty: {name} must be a path or text (or unset)")


@dataclass
class CheckedSettings(KNNSettings):
    """What sample.py and evaluate.py share: the memory's settings (knn.KNNSettings) and the range checks
    of the settings both have, in validate(), which load_config and main() run before any work."""

    def validate(self):
        """The model's source, the batches, the memory and the kNN-LM's neighbours: ConfigError naming the
        setting and its allowed range; the memory's choices are KNNSettings.check's (KNNMemoryError)."""
        not_empty(self, "init_from", "out_dir", "eval_file", "eval_out", "knnlm_dir")
        for name in ("out_dir", "eval_out"):  # found before the evaluation runs, not when its results are written
            path = getattr(self, name)
            need(not (path and os.path.exists(path) and not os.path.isdir(path)),
                 f"{name}={path!r} is a file: {name} names a folder (for the JSON and the plot); choose another path")
        need(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
             f"device={self.device!r} is not allowed: device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        at_least(self, 0, "seed", "knn", "mem_frac", "remove_bookkeeping", "knn_nlist")
        at_least(self, 1, "batch_size", "eval_items", "knn_pq_m", "knnlm_k", "knn_nprobe")
        at_least(self, len(SPECIALS), "vocab_capacity")
        above(self, 0, "knn_softmax_influence", "knnlm_temperature")
        for name in ("bookkeeping_frac", "resid_frac"):
            value = getattr(self, name)
            need(0 <= value <= 1, f"{name}={value!r} is out of range: {name} must be in [0, 1]")
        self.check(len(self.knn))
