"""
Speed benchmarks: training tokens/s and generation tokens/s (batch 1 and 8, with and without
the KV cache) for a model shaped by a training config, with random weights and random tokens.
For a DNC task's config: the DNC's forward + backward time and memory, dense and sparse links,
against a step-serial reference implementation.

    python bench.py config/train_facts.py
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --device=cuda --compile=True
    python bench.py config/bench_dnc.py

Prints a table and writes JSON (bench_json). Numbers, not pass/fail: targets are read from here,
never asserted in timed tests.
"""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch.nn import functional as F

from configurator import ConfigError, format_config, load_config
from model import GPT, GPTConfig
from train import TrainConfig, autocast_context, resolve_device


@dataclass
class BenchConfig(TrainConfig):
    vocab_size: int = 50257
    bench_iters: int = 10  # timed training steps (after 2 untimed warm-up steps)
    gen_tokens: int = 128  # tokens generated per timed generation
    prompt_len: int = 16
    gen_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    bench_json: str = "bench.json"
    # with task 'copy', 'repeat_copy' or 'assoc_recall': the DNC of that config, forward + backward of
    # batch_size sequences of dnc_seq_len steps, with dense links, sparse ones (sparse_links > 0) and
    # the step-serial reference (dnc_reference), for each memory size in dnc_slots (empty: memory_slots)
    dnc_slots: list[int] = field(default_factory=list)
    dnc_seq_len: int = 20
    dnc_reference: bool = True


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_training(model, cfg, device, dtype) -> dict:
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    step_model = torch.compile(model) if cfg.compile else model
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    ctx = autocast_context(device, dtype)
    V, T, B = model.config.vocab_size, model.config.block_size, cfg.batch_size
    x = torch.randint(0, V, (B, T), device=device)
    y = torch.randint(0, V, (B, T), device=device)

    def step():
        with ctx:
            _, loss = step_model(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(cfg.bench_iters):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / cfg.bench_iters
    tok_s = B * T / dt
    device_name = torch.cuda.get_device_name(device) if device_type == "cuda" else None
    return {"ms_per_iter": dt * 1000, "tokens_per_s": tok_s, "mfu": model.estimate_mfu(tok_s, device_name, dtype)}


@torch.no_grad()
def bench_generation(model, cfg, device, dtype, batch: int, use_cache: bool) -> dict:
    ctx = autocast_context(device, dtype)
    prompt = torch.randint(0, model.config.vocab_size, (batch, cfg.prompt_len), device=device)
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
    with ctx:
        model.generate(prompt, 4, generators=gens, use_cache=use_cache)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        model.generate(prompt, cfg.gen_tokens, generators=gens, use_cache=use_cache)
        sync(device)
    dt = time.perf_counter() - t0
    return {"batch": batch, "kv_cache": use_cache, "tokens_per_s": batch * cfg.gen_tokens / dt,
            "ms_per_token_step": dt / cfg.gen_tokens * 1000}


# -----------------------------------------------------------------------------
# DNC: memory.DNC against a step-serial reference of the same size

def naive_dnc_forward(dnc, x):
    """The DNC's documented equations written out one sample and one read head at a time, the
    way a straightforward port does it: the speed baseline for memory.DNC, and an independent
    check of its numbers in the tests. Shares dnc's controller and layers; dense links only."""
    from memory import DNC_EPS
    c = dnc.cfg
    B, T, _ = x.shape
    N, W, R = c.memory_slots, c.word_size, c.read_heads
    zeros = lambda *shape: torch.zeros(*shape, device=x.device)
    eye = torch.eye(N, device=x.device)
    mem = [zeros(N, W) for _ in range(B)]
    usage = [zeros(N) for _ in range(B)]
    prec = [zeros(N) for _ in range(B)]
    link = [zeros(N, N) for _ in range(B)]
    write_w = [zeros(N) for _ in range(B)]
    read_w = [[zeros(N) for _ in range(R)] for _ in range(B)]
    reads = [[zeros(W) for _ in range(R)] for _ in range(B)]
    ctrl = dnc.controller.initial_state(B, x.device)

    def content(M, key, beta):
        norms = torch.sqrt((M * M).sum(1) + DNC_EPS) * torch.sqrt((key * key).sum() + DNC_EPS)
        return torch.softmax(beta * (M @ key) / norms, dim=0)

    ys = []
    for t in range(T):
        prev_reads = torch.stack([torch.cat(reads[b]) for b in range(B)])
        h, ctrl = dnc.controller(torch.cat([x[:, t], prev_reads], dim=1), ctrl)
        xi = dnc.interface(h)
        for b in range(B):
            parts = iter(xi[b].split([W] * R + [1] * R + [W, 1, W, W] + [1] * R + [1, 1] + [3] * R))
            keys = [next(parts) for _ in range(R)]
            betas = [1 + F.softplus(next(parts)) for _ in range(R)]
            wkey, wbeta = next(parts), 1 + F.softplus(next(parts))
            erase, wvec = torch.sigmoid(next(parts)), next(parts)
            free = [torch.sigmoid(next(parts)) for _ in range(R)]
            ga, gw = torch.sigmoid(next(parts)), torch.sigmoid(next(parts))
            modes = [torch.softmax(next(parts), dim=0) for _ in range(R)]
            psi = torch.ones(N, device=x.device)
            for r in range(R):
                psi = psi * (1 - free[r] * read_w[b][r])
            u = (usage[b] + write_w[b] - usage[b] * write_w[b]) * psi
            usage[b] = u
            u = DNC_EPS + (1 - DNC_EPS) * u
            su, phi = torch.sort(u, stable=True)
            before = torch.cumprod(torch.cat([torch.ones(1, device=x.device), su[:-1]]), dim=0)
            alloc = zeros(N).scatter(0, phi, (1 - su) * before)
            ww = gw * (ga * alloc + (1 - ga) * content(mem[b], wkey, wbeta))
            mem[b] = mem[b] * (1 - torch.outer(ww, erase)) + torch.outer(ww, wvec)
            link[b] = ((1 - ww[:, None] - ww[None, :]) * link[b] + torch.outer(ww, prec[b])) * (1 - eye)
            prec[b] = (1 - ww.sum()) * prec[b] + ww
            write_w[b] = ww
            for r in range(R):
                fwd, bwd = link[b] @ read_w[b][r], link[b].t() @ read_w[b][r]
                wr = modes[r][0] * bwd + modes[r][1] * content(mem[b], keys[r], betas[r]) + modes[r][2] * fwd
                read_w[b][r] = wr
                reads[b][r] = mem[b].t() @ wr
        now_reads = torch.stack([torch.cat(reads[b]) for b in range(B)])
        ys.append(dnc.output(torch.cat([h, now_reads], dim=1)))
    return torch.stack(ys, dim=1)


def time_forward_backward(forward, x, iters, device):
    """Mean seconds for forward(x) + backward of a scalar loss, and the bytes of the tensors autograd
    keeps for the backward pass (the memory a training step needs beyond the weights)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # warm-up, and the memory count
        loss = forward(x).pow(2).mean()
    loss.backward()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        forward(x).pow(2).mean().backward()
    sync(device)
    return (time.perf_counter() - t0) / iters, sum(saved.values())


def bench_dnc(cfg: BenchConfig, device: str) -> dict:
    from memory import DNC
    from tasks import ALGORITHMIC, dnc_config
    if cfg.task not in ALGORITHMIC:
        raise ConfigError(f"bench.py times the GPT (task='lm') or the DNC of task {', '.join(ALGORITHMIC)}; "
                          f"not {cfg.task!r}")
    B, T = cfg.batch_size, cfg.dnc_seq_len
    print(f"DNC forward + backward, batch {B} x {T} steps, on {device}, {torch.get_num_threads()} CPU threads")
    rows, runs = [], []
    for N in cfg.dnc_slots or [cfg.memory_slots]:
        variants = [("dense links", 0)] + ([(f"sparse links K={cfg.sparse_links}", cfg.sparse_links)]
                                           if cfg.sparse_links else [])
        dense_s = None
        for label, K in variants + ([("step-serial reference", 0)] if cfg.dnc_reference else []):
            torch.manual_seed(cfg.seed)
            dnc = DNC(dnc_config(replace(cfg, memory_slots=N, sparse_links=K))).to(device)
            x = torch.randn(B, T, dnc.cfg.input_size, device=device)
            if label == "step-serial reference":
                forward = lambda x: naive_dnc_forward(dnc, x)
            else:
                forward = lambda x: dnc(x)[0]
            seconds, saved = time_forward_backward(forward, x, cfg.bench_iters, device)
            dense_s = dense_s or seconds
            note = f"{saved / 2**20:,.2f} MB kept for backward"
            if label != "dense links":
                note += f", {seconds / dense_s:.2f}x the dense DNC's time"
            rows.append((f"DNC N={N} W={cfg.word_size} R={cfg.read_heads}, {label}", f"{seconds * 1000:,.1f} ms", note))
            runs.append({"memory_slots": N, "variant": label, "sparse_links": K, "ms_per_batch": seconds * 1000,
                         "saved_for_backward_mb": saved / 2**20})
    print_table(rows, "per batch")
    result = {"settings": asdict(cfg), "device": device, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "dnc": runs}
    write_result(result, cfg.bench_json)
    return result


def main(cfg: BenchConfig) -> dict:
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    print(f"settings:\n{format_config(cfg)}")
    if cfg.task != "lm":
        return bench_dnc(cfg, device)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias)).to(device)
    print(f"model: {model.get_num_params() / 1e6:.2f}M parameters on {device} ({dtype}), "
          f"{torch.get_num_threads()} CPU threads")
    rows = []
    train_res = bench_training(model, cfg, device, dtype)
    mfu = f"{train_res['mfu'] * 100:.1f}%" if train_res["mfu"] is not None else "unknown"
    rows.append((f"train (batch {cfg.batch_size} x {cfg.block_size})", f"{train_res['tokens_per_s']:,.0f} tok/s",
                 f"{train_res['ms_per_iter']:.1f} ms/iter, mfu {mfu}"))
    model.eval()
    gen_res = []
    if cfg.prompt_len + cfg.gen_tokens > cfg.block_size:
        print(f"note: prompt_len + gen_tokens exceeds block_size {cfg.block_size}: the window is cropped")
    for batch in cfg.gen_batch_sizes:
        pair = {c: bench_generation(model, cfg, device, dtype, batch, c) for c in (True, False)}
        gen_res += list(pair.values())
        speedup = pair[True]["tokens_per_s"] / pair[False]["tokens_per_s"]
        for c in (True, False):
            rows.append((f"generate batch {batch}, {'KV cache' if c else 'recompute'}",
                         f"{pair[c]['tokens_per_s']:,.0f} tok/s",
                         f"{pair[c]['ms_per_token_step']:.2f} ms/step" + (f", cache {speedup:.2f}x" if c else "")))
    print_table(rows, "throughput")
    result = {"settings": asdict(cfg), "device": device, "dtype": dtype, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "train": train_res, "generate": gen_res}
    write_result(result, cfg.bench_json)
    return result


def print_table(rows, value_header):
    width = max(len(r[0]) for r in rows)
    print(f"\n{'benchmark'.ljust(width)} | {value_header:>16} | notes")
    print("-" * (width + 40))
    for name, value, note in rows:
        print(f"{name.ljust(width)} | {value:>16} | {note}")


def write_result(result, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    try:
        main(load_config(BenchConfig))
    except ConfigError as e:
        sys.exit(f"error: {e}")
