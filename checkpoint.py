"""
Checkpoints: written by train.py, read by every script. A checkpoint is a dict of tensors and plain
Python (loaded with torch.load(weights_only=True)) holding the model's weights, its arguments
(`model_args`: GPTConfig or chat.Seq2SeqConfig) and, apart from them, the arguments of the trainable
memories attached to it (`memory_args`: memory.MemoryConfig). Checkpoints written before the two were
kept apart carry the memory fields inside model_args; they are split here, so they load unchanged.
"""

import os
from dataclasses import asdict, fields

import torch

from chat import Seq2Seq, Seq2SeqConfig
from common import first_line
from memory import MemoryConfig, attach_memories
from configurator import ConfigError
from model import GPT, PACKAGED_GGUF, GPTConfig, pretrained_tokenizer_meta
from prepare import DataError, WordVocab, get_tokenizer
from runs import check_init_from as check_run_init_from

MEMORY_KEYS = tuple(f.name for f in fields(MemoryConfig))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by train.py (tensors and plain Python only: weights_only)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: train first, or set out_dir to the folder holding ckpt.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                              "restore it from a copy or start again with init_from='scratch'") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a mnemo checkpoint (no 'model'/'model_args' entries)")
    return split_memory_args(ckpt)


def split_memory_args(ckpt: dict) -> dict:
    """Move memory fields that older checkpoints kept in model_args into memory_args."""
    args = dict(ckpt["model_args"])
    mem = dict(ckpt.get("memory_args") or {})
    seq2seq = args.get("model_type") == "seq2seq"
    for key in MEMORY_KEYS:
        if key in args and not (seq2seq and key in {f.name for f in fields(Seq2SeqConfig)}):
            mem.setdefault(key, args.pop(key))
    return {**ckpt, "model_args": args, "memory_args": mem}


def model_from_checkpoint(ckpt: dict, memory: dict | None = None, **overrides):
    """The model (GPT or Seq2Seq) a checkpoint describes, with its memories attached and its weights loaded;
    memory and overrides replace memory_args and model_args fields (a resumed run's training choices).
    Arguments or weights this code cannot build are a CheckpointError."""
    args = {**ckpt["model_args"], **overrides}
    try:
        if args.get("model_type") == "seq2seq":
            model = Seq2Seq(Seq2SeqConfig(**args))
        else:
            mem = MemoryConfig(**{**ckpt.get("memory_args", {}), **(memory or {})})
            model = attach_memories(GPT(GPTConfig(**args)), mem)
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"the checkpoint does not describe a model this code builds ({type(e).__name__}: "
                              f"{first_line(e)}); it was written by other code: train it again") from None
    return model


def model_args(model) -> dict:
    return asdict(model.config)


def memory_args(model) -> dict:
    return dict(getattr(model, "memory_args", {}))


def check_init_from(init_from: str):
    """Refuse an init_from that names nothing to load (a typo such as 'scrach' would otherwise go to the
    Hugging Face hub as a model name). Pretrained weights are what training takes (runs.check_init_from)."""
    try:
        check_run_init_from(init_from)
        ok = init_from != "scratch"  # a new model: nothing to sample from
    except ConfigError:
        ok = False
    if not ok:
        names = ("gpt2", "gpt2-medium", "...", *PACKAGED_GGUF)
        raise CheckpointError(f"init_from={init_from!r}: init_from must be 'resume', a pretrained name "
                              f"({', '.join(names)}) or an existing folder/.gguf file")


def load_model(init_from: str, out_dir: str, device: str):
    """(model in eval mode, tokenizer, tokenizer meta, where it came from): init_from 'resume' reads
    out_dir/ckpt.pt (a seq2seq chatbot's tokenizer is its elastic vocabulary), anything else is
    pretrained weights (GPT.from_pretrained). What cannot be loaded is a CheckpointError."""
    check_init_from(init_from)
    if init_from == "resume":
        path = os.path.join(out_dir, "ckpt.pt")
        ckpt = load_checkpoint(path, map_location=device)
        if not isinstance(ckpt.get("meta"), dict) or not isinstance(ckpt["meta"].get("tokenizer"), str):
            raise CheckpointError(f"{path} has no tokenizer description ('meta'); it was not written by train.py")
        try:
            model = model_from_checkpoint(ckpt, dropout=0.0)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        meta, source = ckpt["meta"], path
        if ckpt.get("vocab"):  # the elastic vocabulary as training left it
            model.eval().to(device)
            try:
                return model, WordVocab.from_dict(ckpt["vocab"]), meta, source
            except DataError as e:
                raise CheckpointError(f"{path}: {e}") from None
    else:
        try:
            model = GPT.from_pretrained(init_from)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"could not load pretrained weights init_from={init_from!r} ({first_line(e)}); "
                                  "offline, pass a local folder written by save_pretrained") from None
        # GPT-2's BPE for a GPT-2, the model's own tokenizer (transformers) for the Llama family
        meta, source = pretrained_tokenizer_meta(init_from, model), init_from
    model.eval().to(device)
    try:
        return model, get_tokenizer(meta), meta, source
    except KeyError as e:
        raise CheckpointError(f"{source}: its tokenizer description lacks {e}; it was not written by train.py") from None

