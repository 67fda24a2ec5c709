"""
Speed benchmarks for a model shaped by a training config, with random weights and random tokens:

- suite 'train', 'generate': training tokens/s; generation tokens/s (batch 1 and 8, with and
  without the KV cache);
- suite 'knn': the persistent kNN memory (config/bench_knn.py: GPT-2 small shape). Generation
  with the memory on vs off for memory sizes knn_sizes (faiss IVF from knn_ivf_from entries up),
  exact search backends against each other, build throughput vs a plain forward pass, the same
  text placed in the context instead, and the reference's recomputing per-head-loop path.
- suite 'memorizing' (config/bench_memorizing.py): training tokens/s with a Memorizing Transformer
  layer (knn_layer, its memory full at knn_memory_size entries per row and head) against the same
  model without it, and kNN-LM scoring tokens/s (a datastore of knnlm_size entries) against plain scoring.
- suite 'recipes' (with a config/train_passkey_*.py): training tokens/s of the long-range recipes'
  memories, a memorizing layer (memory full) and an MNM block, against the same model without one.
- a DNC task's config (task 'copy', ...): the DNC's forward + backward time and memory, dense and
  sparse links, against a step-serial reference implementation.

    python bench.py config/train_facts.py
    python bench.py config/bench_knn.py
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --device=cuda --compile=True
    python bench.py config/bench_dnc.py

Prints a table and writes JSON (bench_json). Numbers, not pass/fail: targets are read from here,
never asserted in timed tests.
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch.nn import functional as F

from configurator import ConfigError, format_config, load_config
from common import autocast_context, resolve_device, write_json
from knn import KNNMemory, KNNSettings, FaissIndex, TorchIndex
from model import GPT, GPTConfig
from train import TrainConfig


@dataclass
class BenchConfig(TrainConfig):
    vocab_size: int | None = None  # None: the prepared dataset's (data_dir/dataset), else GPT-2's 50257
    bench_iters: int = 10  # timed training steps (after 2 untimed warm-up steps)
    gen_tokens: int = 128  # tokens generated per timed generation
    prompt_len: int = 16
    gen_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    bench_json: str = "bench.json"
    suite: list[str] = field(default_factory=lambda: ["train", "generate"])  # and/or 'knn'
    knn_sizes: list[int] = field(default_factory=lambda: [1000, 10000, 100000, 1000000])  # entries per layer
    knn_layer: int = 9  # the memory layer (the reference's recall layer)
    knn_ivf_from: int = 1000000  # memories this large use faiss IVF instead of exact search
    knn_context: int = 640  # tokens of the text compared in context vs in memory
    knnlm_size: int = 100000  # suite 'memorizing': kNN-LM datastore entries (random keys, exact torch search)
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


def timed(fn, reps=1):
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def reference_knn_hook(mem: KNNMemory, layer: int, k: int):
    """The reference's structure: attention written out per head in a Python loop, one faiss
    IndexFlatL2 search per chosen (head, position), the whole context recomputed every token."""
    import faiss
    s = mem.settings
    indexes = []
    for h in range(mem.n_head):
        ix = faiss.IndexFlatL2(mem.head_size)
        ix.add(mem.keys[layer][h].numpy())
        indexes.append(ix)

    def hook(attn, q, kc, v, attend):
        B, H, T, d = q.shape
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)
        out = []
        for h in range(H):
            att = ((q[:, h] @ kc[:, h].transpose(-2, -1)) / math.sqrt(d)).masked_fill(causal, float("-inf")).softmax(-1)
            vh = v[:, h].clone()
            for b in range(B):
                row = att[b, -1]
                chosen = [0] if row[0] > s.bookkeeping_frac else []
                if s.mem_frac > 0:
                    chosen += [j for j in range(1, T) if row[j] >= 1 / (s.mem_frac * T)]
                for j in chosen:
                    _, ids = indexes[h].search(kc[b, h, j][None].numpy(), k)
                    ck = torch.cat([mem.keys[layer][h, ids[0]], kc[b, h, j][None]])
                    cv = torch.cat([mem.values[layer][h, ids[0]], v[b, h, j][None]])
                    w = (s.knn_softmax_influence * (ck @ q[b, h, j]) / math.sqrt(d)).softmax(-1)
                    vh[b, j] = (w[:, None] * cv).sum(0)
            out.append(att @ vh)
        return torch.stack(out, 1)

    hook.recompute = True
    return hook


class Rows(list):
    """Table rows, each also printed as soon as it is measured (the knn suite runs for minutes)."""

    def append(self, row):
        print(" | ".join(row), flush=True)
        super().append(row)


def bench_knn(model, cfg, device, dtype) -> tuple[dict, list]:
    """Rows and results of the 'knn' suite (Type 1 gates opened: every head searches at every token)."""
    rows, res = Rows(), {"search": [], "generate": []}
    H, d = model.config.n_head, model.config.n_embd // model.config.n_head
    L, n = cfg.knn_layer, cfg.gen_tokens
    knn = [0] * model.config.n_layer
    knn[L] = 5
    settings = dict(knn=knn, bookkeeping_frac=0.0, mem_frac=0.0, knn_softmax_influence=1.0)
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, cfg.prompt_len), generator=g).to(device)

    def new_memory(size, **extra):
        mem = KNNMemory(KNNSettings(**{**settings, **extra}), [L], H, d, "bench", {}, 198, device)
        # random entries at GPT-2-like scale: search cost depends on the size, not the content
        mem.add_entries({L: torch.randn(H, size, d, generator=g)}, {L: torch.randn(H, size, d, generator=g)})
        return mem

    def gen_tok_s(use_cache=True, idx=prompt):
        gens = [torch.Generator(device=device).manual_seed(0)]
        with autocast_context(device, dtype):
            dt = timed(lambda: model.generate(idx, n, generators=gens, use_cache=use_cache))
        return n / dt

    # exact search backends, one query per head (the gate at position 0) and 32 per head
    for size in cfg.knn_sizes:
        if size >= cfg.knn_ivf_from:
            continue
        keys = torch.randn(H, size, d, generator=g)
        for per_head in (1, 32):
            heads = torch.arange(H).repeat_interleave(per_head)
            vecs = torch.randn(len(heads), d, generator=g)
            t_torch = timed(lambda: TorchIndex(keys, "l2").search(heads, vecs, 5), reps=5)
            flat = FaissIndex(keys, "l2", "faiss-flat", 0, 1, 8)
            t_faiss = timed(lambda: flat.search(heads, vecs, 5), reps=5)
            res["search"].append({"size": size, "queries": len(heads), "torch_ms": t_torch * 1e3,
                                  "faiss_flat_ms": t_faiss * 1e3})
            rows.append((f"exact search {size:,} x {H} heads, {len(heads)} queries", f"torch {t_torch * 1e3:.2f} ms",
                         f"faiss-flat {t_faiss * 1e3:.2f} ms ({t_faiss / t_torch:.2f}x torch)"))

    # generation with the memory on vs off (KV cache)
    KNNMemory.detach(model)
    off = gen_tok_s()
    res["generate"].append({"memory": 0, "tokens_per_s": off})
    rows.append((f"generate {n} tokens, memory off", f"{off:,.1f} tok/s", "KV cache"))
    # causal mode at every size; the reference mode (recomputing the layers from L up) at the smallest
    for size in cfg.knn_sizes:
        ivf = size >= cfg.knn_ivf_from
        extra = dict(knn_backend="faiss-ivf", knn_nlist=1024, knn_nprobe=16) if ivf else {}
        for recompute in (False, True) if size == cfg.knn_sizes[0] else (False,):
            mem = new_memory(size, knn_recompute=recompute, **extra)
            t0 = time.perf_counter()
            mem.index(L)
            t_index = time.perf_counter() - t0
            mem.attach(model)
            on = gen_tok_s()
            KNNMemory.detach(model)
            mode = "reference" if recompute else "causal"
            res["generate"].append({"memory": size, "mode": mode, "backend": mem.backend,
                                    "tokens_per_s": on, "slowdown": off / on, "index_build_s": t_index})
            rows.append((f"generate {n} tokens, memory {size:,} ({mem.backend}, {mode})",
                         f"{on:,.1f} tok/s", f"{off / on:.2f}x the time of memory off"))
            del mem

    # build throughput vs a plain forward pass over the same windows
    mem = new_memory(0)
    tokens = torch.randint(0, model.config.vocab_size, (4 * (model.config.block_size - 1),), generator=g).tolist()
    t_build = timed(lambda: mem.add_tokens(model, tokens))
    step = model.config.block_size - 1
    windows = torch.tensor([[198] + tokens[i:i + step] for i in range(0, len(tokens), step)], device=device)
    with torch.no_grad():
        t_fwd = timed(lambda: model(windows))
    res["build"] = {"tokens": len(tokens), "tokens_per_s": len(tokens) / t_build, "forward_ratio": t_fwd / t_build}
    rows.append((f"build memory from {len(tokens):,} tokens", f"{len(tokens) / t_build:,.0f} tok/s",
                 f"{t_fwd / t_build:.2f}x the speed of a plain forward pass"))

    # the same text in the context instead of in the memory
    text = torch.randint(0, model.config.vocab_size, (1, cfg.knn_context), generator=g).to(device)
    in_ctx = gen_tok_s(idx=torch.cat([text, prompt], 1))
    in_mem = {}
    for recompute in (False, True):
        mem = new_memory(0, knn_recompute=recompute)
        mem.add_tokens(model, text[0].tolist())
        mem.attach(model)
        in_mem["reference" if recompute else "causal"] = gen_tok_s()
        KNNMemory.detach(model)
    res["context_vs_memory"] = {"text_tokens": cfg.knn_context, "in_context_tok_s": in_ctx,
                                "in_memory_tok_s": in_mem}
    rows.append((f"text of {cfg.knn_context} tokens in context", f"{in_ctx:,.1f} tok/s",
                 f"in memory: {in_mem['causal']:,.1f} tok/s causal ({in_mem['causal'] / in_ctx:.2f}x), "
                 f"{in_mem['reference']:,.1f} reference mode ({in_mem['reference'] / in_ctx:.2f}x)"))

    # the reference's path: recompute everything every token, per-head loop, faiss per query
    model.attentions[L].memory = reference_knn_hook(mem, L, 5)
    ref = gen_tok_s(use_cache=False)
    KNNMemory.detach(model)
    res["reference"] = {"memory": cfg.knn_context, "tokens_per_s": ref, "ours_tokens_per_s": in_mem,
                        "speedup": {m: t / ref for m, t in in_mem.items()}}
    rows.append((f"reference implementation, memory {cfg.knn_context}", f"{ref:,.1f} tok/s",
                 f"ours: {in_mem['reference'] / ref:.1f}x faster (same semantics), "
                 f"{in_mem['causal'] / ref:.1f}x (causal)"))
    return res, rows


def bench_memorizing(cfg, device, dtype, vocab_size) -> tuple[dict, list]:
    """Training with a memorizing layer (memory full: every step searches knn_memory_size entries per row
    and head, then appends its window) vs without; kNN-LM scoring vs plain scoring."""
    from knn import KNNLMDatastore, knnlm_log_probs, last_mlp_input
    from memory import MemoryConfig, attach_memories, memorizing_layer
    rows, res = Rows(), {}
    shape = dict(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                 n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias)
    if not 0 <= cfg.knn_layer < cfg.n_layer:
        raise ConfigError(f"suite 'memorizing' needs 0 <= knn_layer < n_layer={cfg.n_layer}, got {cfg.knn_layer}")
    speed = {}
    layer = dict(knn_layer=cfg.knn_layer, knn_topk=cfg.knn_topk, knn_memory_size=cfg.knn_memory_size)
    for label, extra in (("plain", {}), ("memorizing", layer),
                         ("memorizing_bf16", {**layer, "knn_search_dtype": "bfloat16"})):
        torch.manual_seed(cfg.seed)
        model = attach_memories(GPT(GPTConfig(**shape)), MemoryConfig(**extra)).to(device)
        mem = memorizing_layer(model)
        if mem is not None:  # fill every row's memory with random entries (cost depends on the size only)
            mem.reset(cfg.batch_size)
            H, d = cfg.n_head, cfg.n_embd // cfg.n_head
            mem._alloc(cfg.batch_size, torch.zeros(1, device=device))
            k = torch.randn(cfg.batch_size, H, cfg.knn_memory_size, d, device=device)
            mem.append(torch.arange(cfg.batch_size, device=device), k, torch.randn_like(k))
        speed[label] = bench_training(model, cfg, device, dtype)
    slowdown = {k: speed["plain"]["tokens_per_s"] / speed[k]["tokens_per_s"] for k in ("memorizing", "memorizing_bf16")}
    res["train"] = {**speed, "slowdown": slowdown["memorizing"], "slowdown_bf16_search": slowdown["memorizing_bf16"]}
    rows.append((f"train (batch {cfg.batch_size} x {cfg.block_size}), no memory", f"{speed['plain']['tokens_per_s']:,.0f} tok/s",
                 f"{speed['plain']['ms_per_iter']:.1f} ms/iter"))
    for key, search in (("memorizing", "float32"), ("memorizing_bf16", "bfloat16")):
        rows.append((f"train, memorizing layer {cfg.knn_layer}, {cfg.knn_memory_size:,} entries, top {cfg.knn_topk}, "
                     f"{search} search", f"{speed[key]['tokens_per_s']:,.0f} tok/s",
                     f"{slowdown[key]:.2f}x the time of no memory"))

    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**shape)).to(device).eval()
    store = KNNLMDatastore.create(model, KNNSettings(knn_backend="torch"), {})
    g = torch.Generator().manual_seed(cfg.seed)
    L = cfg.n_layer - 1
    store.add_entries({L: torch.randn(1, cfg.knnlm_size, cfg.n_embd, generator=g)},
                      {L: torch.randint(0, vocab_size, (1, cfg.knnlm_size, 1), generator=g).float()})
    x = torch.randint(0, vocab_size, (cfg.batch_size, cfg.block_size), device=device)
    ctx = autocast_context(device, dtype)
    with torch.no_grad(), ctx:
        t_plain = timed(lambda: model(x, x), reps=cfg.bench_iters)
        t_knn = timed(lambda: knnlm_log_probs(*reversed(last_mlp_input(model, x)), store, 0.25, 64, 1.0),
                      reps=cfg.bench_iters)
    n = x.numel()
    res["knnlm"] = {"entries": cfg.knnlm_size, "plain_tok_s": n / t_plain, "knnlm_tok_s": n / t_knn,
                    "slowdown": t_knn / t_plain}
    rows.append(("score, plain", f"{n / t_plain:,.0f} tok/s", ""))
    rows.append((f"score, kNN-LM {cfg.knnlm_size:,} entries (exact), k=64", f"{n / t_knn:,.0f} tok/s",
                 f"{t_knn / t_plain:.2f}x the time of plain"))
    return res, rows


def bench_recipes(cfg, device, dtype, vocab_size) -> tuple[dict, list]:
    """Suite 'recipes': training tokens/s of the long-range recipes' memories (config/train_passkey_*.py)
    against the same model without one: a memorizing layer at knn_layer (its memory full at
    knn_memory_size entries per row and head, so every step searches all of them) and an MNM block at
    mnm_layer (each -1: layer n_layer // 2), written every step like a document's next window."""
    from memory import MemoryConfig, attach_memories, memorizing_layer, mnm_block
    rows, speed = Rows(), {}
    shape = dict(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                 n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias)
    mid = cfg.n_layer // 2
    knn_layer = cfg.knn_layer if 0 <= cfg.knn_layer < cfg.n_layer else mid
    mnm_layer = cfg.mnm_layer if 0 <= cfg.mnm_layer < cfg.n_layer else mid
    arms = (("no memory", {}),
            (f"memorizing layer {knn_layer}, {cfg.knn_memory_size:,} entries, top {cfg.knn_topk}",
             dict(knn_layer=knn_layer, knn_topk=cfg.knn_topk, knn_memory_size=cfg.knn_memory_size)),
            (f"MNM block {mnm_layer} ({cfg.mnm_write}, {cfg.mnm_heads} heads, hidden {cfg.mnm_hidden})",
             dict(mnm_layer=mnm_layer, mnm_heads=cfg.mnm_heads, mnm_key_size=cfg.mnm_key_size,
                  mnm_hidden=cfg.mnm_hidden, mnm_write=cfg.mnm_write)))
    for label, extra in arms:
        torch.manual_seed(cfg.seed)
        model = attach_memories(GPT(GPTConfig(**shape)), MemoryConfig(**extra)).to(device)
        mem = memorizing_layer(model)
        if mem is not None:  # every row's memory full of random entries: the cost of a long document's end
            mem.reset(cfg.batch_size)
            mem._alloc(cfg.batch_size, torch.zeros(1, device=device))
            k = torch.randn(cfg.batch_size, cfg.n_head, cfg.knn_memory_size, cfg.n_embd // cfg.n_head, device=device)
            mem.append(torch.arange(cfg.batch_size, device=device), k, torch.randn_like(k))
        if mnm_block(model) is not None:
            mnm_block(model).reset(cfg.batch_size)
        speed[label] = bench_training(model, cfg, device, dtype)
        ratio = speed["no memory"]["tokens_per_s"] / speed[label]["tokens_per_s"]
        speed[label]["slowdown"] = ratio
        rows.append((f"train (batch {cfg.batch_size} x {cfg.block_size}), {label}",
                     f"{speed[label]['tokens_per_s']:,.0f} tok/s",
                     f"{speed[label]['ms_per_iter']:.1f} ms/iter" + (f", {ratio:.2f}x the time of no memory" if extra else "")))
    return speed, rows


# -----------------------------------------------------------------------------
# DNC: memory.DNC against a step-serial reference of the same size

def naive_dnc_forward(dnc, x):
    """The DNC's documented equations written out one sample and one read head at a time, the
    way a straightforward port does it: the speed baseline for memory.DNC, and an independent
    check of its numbers in the tests. Shares dnc's controller and layers; dense links only."""
    from dnc import DNC_EPS
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
    from dnc import DNC
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
    vocab_size = cfg.vocab_size
    if vocab_size is None:
        meta_path = os.path.join(cfg.data_dir, cfg.dataset, "meta.json")
        vocab_size = json.load(open(meta_path))["vocab_size"] if os.path.isfile(meta_path) else 50257
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias)).to(device)
    print(f"model: {model.get_num_params() / 1e6:.2f}M parameters on {device} ({dtype}), "
          f"{torch.get_num_threads()} CPU threads")
    unknown = set(cfg.suite) - {"train", "generate", "knn", "memorizing", "recipes"}
    if unknown:
        raise ConfigError(f"unknown suite {sorted(unknown)}; choose from 'train', 'generate', 'knn', 'memorizing', "
                          "'recipes'")
    rows = []
    result = {"settings": asdict(cfg), "device": device, "dtype": dtype, "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    if "train" in cfg.suite:
        train_res = result["train"] = bench_training(model, cfg, device, dtype)
        mfu = f"{train_res['mfu'] * 100:.1f}%" if train_res["mfu"] is not None else "unknown"
        rows.append((f"train (batch {cfg.batch_size} x {cfg.block_size})", f"{train_res['tokens_per_s']:,.0f} tok/s",
                     f"{train_res['ms_per_iter']:.1f} ms/iter, mfu {mfu}"))
    model.eval()
    gen_res = []
    if cfg.prompt_len + cfg.gen_tokens > cfg.block_size:
        print(f"note: prompt_len + gen_tokens exceeds block_size {cfg.block_size}: the window is cropped")
    for batch in (cfg.gen_batch_sizes if "generate" in cfg.suite else []):
        pair = {c: bench_generation(model, cfg, device, dtype, batch, c) for c in (True, False)}
        gen_res += list(pair.values())
        speedup = pair[True]["tokens_per_s"] / pair[False]["tokens_per_s"]
        for c in (True, False):
            rows.append((f"generate batch {batch}, {'KV cache' if c else 'recompute'}",
                         f"{pair[c]['tokens_per_s']:,.0f} tok/s",
                         f"{pair[c]['ms_per_token_step']:.2f} ms/step" + (f", cache {speedup:.2f}x" if c else "")))
    if gen_res:
        result["generate"] = gen_res
    if "knn" in cfg.suite:
        result["knn"], knn_rows = bench_knn(model, cfg, device, dtype)
        rows += knn_rows
    if "memorizing" in cfg.suite:
        result["memorizing"], mem_rows = bench_memorizing(cfg, device, dtype, vocab_size)
        rows += mem_rows
    if "recipes" in cfg.suite:
        result["recipes"], recipe_rows = bench_recipes(cfg, device, dtype, vocab_size)
        rows += recipe_rows
    print_table(rows, "throughput")
    write_result(result, cfg.bench_json)
    return result


def print_table(rows, value_header):
    width = max(len(r[0]) for r in rows)
    print(f"\n{'benchmark'.ljust(width)} | {value_header:>16} | notes")
    print("-" * (width + 40))
    for name, value, note in rows:
        print(f"{name.ljust(width)} | {value:>16} | {note}")


def write_result(result, path):
    write_json(path, result)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    try:
        main(load_config(BenchConfig))
    except ConfigError as e:
        sys.exit(f"error: {e}")
