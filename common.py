"""
The bottom of the import graph: what every script shares and nothing project-specific.
Distributed set-up and rank-0 printing, device and autocast choice, RNG state for exact
resumes, atomic file writes (every file the project writes goes through atomic_write), the
JSON / figure writers, and clear errors for bad input: DataError, read_jsonl (every JSONL file the
scripts read, checked line by line) and cli (a script's entry point: one line on stderr instead of a
traceback). Imports no other module of the project except configurator.
"""

import json
import math
import os
import random
import re
import sys
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch

from configurator import ConfigError


class DataError(Exception):
    """A problem with the data that the user can fix; the message says how."""


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
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but this machine has no CUDA GPU: use device='cpu' or 'auto'")
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

def atomic_write(path, write, mode: str = "wb", replace: bool = True):
    """write(f) into a temp file in the same folder (PATH.PID.tmp), fsync, then rename over `path`: a crash
    at any point leaves either the old file or the new one, never a torn one. If write() raises (or the run
    is interrupted) the temp file is removed; a killed run's are cleared by remove_stale_temps. Every file
    the project writes goes through here (checkpoints, results, plots, conversation states, datasets).
    replace=False leaves the finished temp file for the caller to rename together with others
    (prepare.py commits a dataset's files at once) and returns its path; otherwise returns `path`."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path if replace else tmp


def remove_stale_temps(folder) -> list[tuple[str, int]]:
    """Remove the temp files that killed runs left in folder: NAME.PID.tmp whose process is gone, and
    NAME.tmp (no pid: written before temp files carried one). Returns [(path, bytes)] of those removed."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        m = re.fullmatch(r".+?(?:\.(\d+))?\.tmp", name)
        path = os.path.join(folder, name)
        if m and os.path.isfile(path) and not (m.group(1) and _process_alive(int(m.group(1)))):
            removed.append((path, os.path.getsize(path)))
            os.remove(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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


# -----------------------------------------------------------------------------
# bad input: clear errors

def first_line(error) -> str:
    """The first line of an error's message (errors from downloads and torch can span many; ours are one)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _type_name(types) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object", bool: "true/false"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in types)


def check_fields(obj: dict, fields) -> str | None:
    """What is wrong with a JSON object given `fields` (names, or a dict name -> type or tuple of types):
    the missing fields and those of the wrong type, or None when it is fine."""
    types = fields if isinstance(fields, dict) else dict.fromkeys(fields)
    missing = [k for k in types if k not in obj]
    if missing:
        return "no " + ", ".join(f'"{k}"' for k in missing)
    for k, t in types.items():
        allowed = t if isinstance(t, tuple) else (t,)
        # JSON's true/false are Python bools, which are ints too: an integer field takes neither
        if t is not None and (not isinstance(obj[k], allowed) or (isinstance(obj[k], bool) and bool not in allowed)):
            return f'"{k}" is {json.dumps(obj[k])[:40]}, not {_type_name(t)}'
    return None


def read_jsonl(path, required=(), what="items", fix="", validate=None) -> list[dict]:
    """The objects of a JSONL file (one per non-blank line) with clear errors: a missing, binary or empty
    file, a line that is not a JSON object (malformed, or cut short by a crash), or an object without the
    `required` fields (names, or a dict name -> type) stops with a DataError that names the file, the
    line and what to do (`fix`). validate(obj) -> None or what is wrong, for checks beyond field types."""
    path = str(path)
    fix = f"; {fix}" if fix else ""
    shape = f"one JSON object with {', '.join(required)}" if required else "one JSON object"
    if not os.path.isfile(path):
        raise DataError(f"no {what} file {path}{fix}")
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno}; cut short?): "
                                    f"each line must be {shape}{fix}") from None
                problem = (f"a JSON {type(obj).__name__}, not an object" if not isinstance(obj, dict)
                           else check_fields(obj, required) or (validate(obj) if validate else None))
                if problem:
                    raise DataError(f"{path} line {n}: {problem}; each line must be {shape}{fix}")
                items.append(obj)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (binary? {e.reason} at byte {e.start}): {what} are "
                        f"JSON lines{fix}") from None
    if not items:
        raise DataError(f"{path} holds no {what} (the file is empty){fix}")
    return items


def cli(main, settings, errors):
    """A script's entry point: main(settings()), where errors the user can fix (`errors`) end the script
    with one line on stderr (exit status 1) and Ctrl-C with 'interrupted' (status 130), no traceback."""
    try:
        main(settings())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except errors as e:
        sys.exit(f"error: {e}")
