"""
Sample from a trained model (a train.py checkpoint) or from GPT-2 weights.

    python sample.py --out_dir=out-facts --start="Q: Where does Ada live?" --num_samples=3
    python sample.py config/sample_gpt2.py --init_from=path/to/hf_folder --start=FILE:prompt.txt

Sample i is drawn with its own generator seeded seed + i, whatever batch it runs in, so
`--seed=S --num_samples=1` reproduces the sample printed with seed S on its own.
"""

import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

from configurator import ConfigError, format_config, load_config
from model import GPT, CheckpointError, load_checkpoint, model_from_checkpoint
from prepare import DataError, get_tokenizer
from train import autocast_context, resolve_device


@dataclass
class SampleConfig:
    init_from: str = "resume"  # 'resume' (out_dir/ckpt.pt), 'gpt2*', or a local HF GPT-2 folder
    out_dir: str = "out"
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 5
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 200
    top_p: float | None = None
    stop: str | None = None  # end a sample at this token, e.g. '<|endoftext|>' or '\n' (must be one token)
    seed: int = 1337
    batch_size: int = 8  # samples generated side by side
    use_cache: bool = True  # KV cache; False recomputes the context every token
    output_json: str | None = None  # also write every sample with its seed and these settings
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        if not os.path.isfile(path):
            raise ConfigError(f"prompt file {path} not found (start={start!r})")
        with open(path, encoding="utf-8") as f:
            return f.read()
    return start


def load_model(init_from: str, out_dir: str, device: str):
    """(model in eval mode, tokenizer, where it came from) for a checkpoint or GPT-2 weights."""
    if init_from == "resume":
        path = os.path.join(out_dir, "ckpt.pt")
        ckpt = load_checkpoint(path, map_location=device)
        model = model_from_checkpoint(ckpt, dropout=0.0)
        tokenizer = get_tokenizer(ckpt["meta"])
        source = path
    else:
        model = GPT.from_pretrained(init_from)
        tokenizer = get_tokenizer({"tokenizer": "gpt2"})
        source = init_from
    model.eval().to(device)
    return model, tokenizer, source


def encode_stop(tokenizer, stop: str | None) -> int | None:
    if stop is None:
        return None
    ids = tokenizer.encode(stop)
    if len(ids) != 1:
        raise ConfigError(f"stop={stop!r} is {len(ids)} tokens for this tokenizer; it must be exactly one")
    return ids[0]


def main(cfg: SampleConfig) -> list[dict]:
    """Generate cfg.num_samples continuations; returns [{'seed', 'text', 'completion', 'tokens'}]."""
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    print(f"settings:\n{format_config(cfg)}")
    model, tokenizer, source = load_model(cfg.init_from, cfg.out_dir, device)
    if cfg.compile:
        model = torch.compile(model)
    prompt = read_prompt(cfg.start)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ConfigError("the prompt is empty: set start to some text (e.g. --start='\\n')")
    stop_token = encode_stop(tokenizer, cfg.stop)
    ctx = autocast_context(device, dtype)

    samples = []
    for first in range(0, cfg.num_samples, cfg.batch_size):
        seeds = [cfg.seed + i for i in range(first, min(cfg.num_samples, first + cfg.batch_size))]
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        x = torch.tensor([prompt_ids] * len(seeds), dtype=torch.long, device=device)  # (B, T)
        with torch.no_grad(), ctx:
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                               top_p=cfg.top_p, stop_token=stop_token, generators=generators,
                               use_cache=cfg.use_cache)
        for seed, row in zip(seeds, y.tolist()):
            new = row[len(prompt_ids):]
            if stop_token is not None and stop_token in new:
                new = new[:new.index(stop_token) + 1]
            completion = tokenizer.decode(new)
            samples.append({"seed": seed, "text": prompt + completion, "completion": completion, "tokens": new})
            print(f"--- sample {seed - cfg.seed} (seed {seed}) ---")
            print(prompt + completion)

    if cfg.output_json:
        out = {"settings": asdict(cfg), "model": source, "prompt": prompt, "samples": samples}
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output_json)), exist_ok=True)
        tmp = cfg.output_json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, cfg.output_json)
        print(f"wrote {len(samples)} samples to {cfg.output_json}")
    return samples


if __name__ == "__main__":
    try:
        main(load_config(SampleConfig))
    except (ConfigError, DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
