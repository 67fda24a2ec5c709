"""
The bottom of the import graph: what every script shares and nothing project-specific.
Distributed set-up and rank-0 printing, device and autocast choice, RNG state for exact
resumes, atomic file writes (every file the project writes goes through atomic_write), and
the JSON / figure writers. Imports no other module of the project except configurator.
"""

import json
import math
import os
import random
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch

from configurator import ConfigError


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
# random numbers

def seeded_generator(*key) -> torch.Generator:
    """A torch generator that is a pure function of key (ints): what resumed and DDP runs redraw."""
    return torch.Generator().manual_seed(int(np.random.default_rng(list(key)).integers(2**62)))

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
# learning-rate schedule: linear warm-up, then cosine decay to min_lr

def get_lr(it: int, cfg) -> float:
    """cfg: any settings with learning_rate, decay_lr, warmup_iters, lr_decay_iters, max_iters, min_lr."""
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


# -----------------------------------------------------------------------------
# files: atomic writes

def atomic_write(path: str, write, mode: str = "wb"):
    """write(f) into a temp file in the same folder, fsync, then rename over `path`: a crash at any
    point leaves either the old file or the new one, never a torn one. Every file the project writes
    goes through here (checkpoints, results, plots, conversation states)."""
    tmp = f"{path}.tmp"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(obj, path: str):
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


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


def write_eval(cfg, source: str, result: dict, fig) -> dict:
    """Write an evaluation's result (with the settings and the model) as JSON and its figure as PNG,
    to eval_out or out_dir/eval_<eval>; returns the result."""
    out = cfg.eval_out or os.path.join(cfg.out_dir, f"eval_{cfg.eval}")
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, f"{cfg.eval}.json"), {"settings": asdict(cfg), "model": source, **result})
    save_figure(fig, os.path.join(out, f"{cfg.eval}.png"))
    print(f"wrote {out}/{cfg.eval}.json and {cfg.eval}.png")
    return result
