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
- suite 'smollm2' (config/bench_smollm2.py): a real pretrained model (SmolLM2-135M-Instruct, offline),
  greedy generation with the KV cache: transformers' own generate on the same weights, ours with the
  memory off, and ours with a kNN memory of each size in knn_sizes (the settings of knn_config).
- suite 'recipes' (with a config/train_passkey_*.py): training tokens/s of the long-range recipes'
  memories, a memorizing layer (memory full) and an MNM block, against the same model without one.
- a DNC task's config (task 'copy', ...): the DNC's forward + backward time and memory, dense and
  sparse links, against a step-serial reference implementation.

    python bench.py config/train_facts.py
    python bench.py config/bench_knn.py
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --device=cuda --compile=True
    python bench.py config/bench_dnc.py
    python bench.py config/bench_smollm2.py
    python bench.py config/train_passkey_knn.py --suite="['recipes']"

Prints a table and writes JSON (bench_json). Numbers, not pass/fail: targets are read from here,
never asserted in timed tests.
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial

import torch
from torch.nn import functional as F

from configurator import (ConfigError, above, at_least, format_config, load_config, need, one_of, read_config_file,
                          within)
from common import autocast_context, cli, resolve_device, write_json
from dnc import DNC, DNC_EPS
from knn import (BACKENDS, KEY_DTYPES, KNNLMDatastore, KNNMemory, KNNSettings, FaissIndex, TorchIndex,
                 knnlm_log_probs, last_mlp_input)
from memory import MNM, MemoryConfig, MemorizingMemory, attach_memories, memorizing_layer, mnm_block, row_memories
from model import PACKAGED_GGUF, GPT, GPTConfig, gguf_folder, pretrained_tokenizer_meta
from prepare import get_tokenizer
from runs import check_init_from, check_shape_and_device
from tasks import ALGORITHMIC, check_dnc, dnc_config

SUITES = ("train", "generate", "knn", "memorizing", "recipes", "knn_scale", "smollm2")


@dataclass
class BenchConfig:
    # the model: random weights of this shape
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    bias: bool = True
    pos: str = "learned"  # 'learned' (GPT-2's table) or 'rope' (rotary: the long-range recipes)
    vocab_size: int | None = None  # None: the prepared dataset's (data_dir/dataset), else GPT-2's 50257
    dataset: str = "facts"
    data_dir: str = "data"
    # the training step timed: batch_size rows, AdamW
    batch_size: int = 12
    learning_rate: float = 6e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    # system
    device: str = "auto"  # 'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype: str = "auto"  # 'auto', 'float32', 'bfloat16', 'float16'
    compile: bool = False
    seed: int = 1337
    # what to time
    suite: list[str] = field(default_factory=lambda: ["train", "generate"])  # any of SUITES
    bench_iters: int = 10  # timed training steps (after 2 untimed warm-up steps)
    gen_tokens: int = 128  # tokens generated per timed generation
    prompt_len: int = 16
    gen_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    bench_json: str = "bench.json"
    # suite 'knn': the persistent kNN memory
    knn_sizes: list[int] = field(default_factory=lambda: [1000, 10000, 100000, 1000000])  # entries per layer
    knn_layer: int = 9  # the memory layer (the reference's recall layer); suite 'memorizing': the memorizing layer
    knn_ivf_from: int = 1000000  # memories this large use faiss IVF instead of exact search
    knn_context: int = 640  # tokens of the text compared in context vs in memory
    # suite 'memorizing': a Memorizing Transformer layer (memory.MemoryConfig) and kNN-LM scoring
    knn_topk: int = 32
    knn_memory_size: int = 16384  # entries per batch row and head
    knnlm_size: int = 100000  # kNN-LM datastore entries (random keys, exact torch search)
    # suite 'recipes': the memorizing layer above (knn_layer outside the model: layer n_layer // 2) and an MNM
    # block (memory.MemoryConfig) at mnm_layer (-1: layer n_layer // 2, the recipes' middle layer)
    # with the recipe's settings that cost time: knn_grad_windows, knn_mix (the memorizing layer above) and
    # mnm_grad_windows, mnm_pool, mnm_shift, mnm_value, mnm_tie_keys (the MNM block)
    knn_grad_windows: int = 0
    knn_mix: str = "gate"
    mnm_grad_windows: int = 0
    mnm_pool: bool = False
    mnm_shift: bool = False
    mnm_value: str = "hidden"
    mnm_tie_keys: bool = False
    mnm_layer: int = -1
    mnm_heads: int = 4
    mnm_key_size: int = 32
    mnm_hidden: int = 64
    mnm_write: str = "local"  # 'local', 'grad' or 'titans'
    # with task 'copy', 'repeat_copy' or 'assoc_recall': the DNC of that task (tasks.TaskConfig's DNC settings),
    # forward + backward of batch_size sequences of dnc_seq_len steps, with dense links, sparse ones
    # (sparse_links > 0) and the step-serial reference (dnc_reference), for each memory size in dnc_slots
    # (empty: memory_slots)
    task: str = "lm"
    bits: int = 8
    memory_slots: int = 16
    word_size: int = 16
    read_heads: int = 4
    controller: str = "lstm"
    hidden_size: int = 64
    sparse_links: int = 0
    dnc_slots: list[int] = field(default_factory=list)
    dnc_seq_len: int = 20
    dnc_reference: bool = True
    # suite 'knn_scale' (config/bench_knn_scale.py): the kNN memory from 1k to 10M entries of synthetic clustered
    # keys, knn_backend 'auto' at every size, exact search up to knn_scale_exact_max, the other backends at
    # knn_scale_compare_at; large memories are built on disk in knn_scale_dir (mapped, knn_dtype storage)
    knn_scale_sizes: list[int] = field(default_factory=lambda: [1000, 10000, 100000, 1000000])
    knn_scale_exact_max: int = 100000
    knn_scale_compare_at: int = 100000
    knn_scale_compare: list[str] = field(default_factory=lambda: ["faiss-fp16", "faiss-sq8", "faiss-ivf", "faiss-hnsw"])
    knn_scale_dtype: str = "float16"
    knn_scale_disk_from: int = 2000000  # memories of this many entries are built on disk, not in RAM
    knn_scale_dir: str = ""  # '' : a new folder in the system's temp folder
    knn_scale_nlist: int = 0  # IVF lists (0: knn.default_nlist)
    knn_scale_repeats: int = 3  # memory-on / memory-off generation pairs per row; the median ratio is reported
    knn_scale_build_tokens: int = 255  # tokens added per incremental build step (one window)
    knn_scale_heads: int = 0  # >0: the memory holds only this many heads and rows time the searches of all the
    # model's heads against it (one probe per model head per token), scaled to a full memory: for sizes whose
    # every head would not fit the machine's time (each head's index is independent: cost is per head)
    # suite 'smollm2': pretrained weights (model.GPT.from_pretrained, a Llama-family model) and the sample config
    # whose kNN memory settings are timed (its knn, gates and mixing)
    pretrained: str = "smollm2"
    knn_config: str = "config/smollm2_memory.py"

    def validate(self):
        check_shape_and_device(self)
        at_least(self, 1, "vocab_size", "batch_size", "bench_iters", "gen_tokens", "prompt_len", "gen_batch_sizes",
                 "knn_sizes", "knn_ivf_from", "knn_context", "knn_topk", "knn_memory_size", "knnlm_size", "dnc_slots",
                 "dnc_seq_len", "mnm_heads", "mnm_key_size", "mnm_hidden")
        at_least(self, 0, "weight_decay", "seed", "knn_layer", "knn_grad_windows", "mnm_grad_windows")
        one_of(self, "knn_mix", MemorizingMemory.MIXES)
        one_of(self, "pos", ("learned", "rope"))
        at_least(self, -1, "mnm_layer")
        one_of(self, "mnm_write", MNM.WRITES)
        one_of(self, "mnm_value", MNM.VALUES)
        why = MNM.conflict(pool=self.mnm_pool, shift=self.mnm_shift, value=self.mnm_value)
        need(why is None, why)
        if "recipes" in self.suite:
            need(self.mnm_layer < self.n_layer, f"mnm_layer={self.mnm_layer} is out of range: suite 'recipes' needs "
                 f"mnm_layer < n_layer={self.n_layer} (a layer of the model) or -1 (the middle one)")
            need(self.n_embd % self.mnm_heads == 0, f"mnm_heads={self.mnm_heads} must divide n_embd={self.n_embd}: "
                 "suite 'recipes' splits the MNM block's input among its heads")
        above(self, 0, "learning_rate")
        within(self, 0, 1, "beta1", "beta2")
        one_of(self, "dtype", ("auto", "float32", "bfloat16", "float16"))
        one_of(self, "suite", SUITES)
        need(self.pretrained not in ("scratch", "resume"), f"pretrained={self.pretrained!r} is not pretrained weights: "
             "pretrained must be a name or path model.GPT.from_pretrained loads (e.g. 'smollm2')")
        check_init_from(self.pretrained, name="pretrained")
        if "smollm2" in self.suite:
            need(os.path.isfile(self.knn_config), f"knn_config={self.knn_config!r} is not a file: suite 'smollm2' "
                 "reads its memory settings from a sample config (e.g. config/smollm2_memory.py)")
        need("smollm2" not in self.suite or self.suite == ["smollm2"], f"suite={self.suite}: suite 'smollm2' times a "
             "pretrained model, the other suites a random one of the config's shape; run it alone (suite=['smollm2'])")
        one_of(self, "task", ("lm",) + ALGORITHMIC)
        if {"knn", "memorizing", "knn_scale"} & set(self.suite) and self.task == "lm":
            need(0 <= self.knn_layer < self.n_layer, f"knn_layer={self.knn_layer} is out of range: suites 'knn', "
                 f"'memorizing' and 'knn_scale' need 0 <= knn_layer < n_layer={self.n_layer}")
        at_least(self, 1, "knn_scale_sizes", "knn_scale_repeats", "knn_scale_build_tokens")
        at_least(self, 0, "knn_scale_exact_max", "knn_scale_compare_at", "knn_scale_disk_from", "knn_scale_nlist",
                 "knn_scale_heads")
        one_of(self, "knn_scale_dtype", KEY_DTYPES)
        one_of(self, "knn_scale_compare", BACKENDS)
        check_dnc(self)


# a training config (python bench.py config/train_facts.py) sets these too: bench.py reads past them
TRAINING_ONLY = ("out_dir", "eval_interval", "log_interval", "eval_iters", "eval_only", "always_save_checkpoint",
                 "init_from", "overwrite", "wandb_log", "wandb_project", "wandb_run_name",
                 "gradient_accumulation_steps", "loader", "dropout", "max_iters", "grad_clip", "decay_lr",
                 "warmup_iters", "lr_decay_iters", "min_lr", "knn_search_dtype", "knn_gate_init", "knn_learn_scale",
                 "knn_distance", "answer_loss", "mnm_write_penalty", "mnm_write_budget", "mnm_key_spread",
                 "n_enc_layer", "memory",
                 "mnm_read", "mnm_tbptt", "dialog_slots",
                 "vocab_prune_every", "vocab_min_count", "vocab_capacity", "optimizer",
                 "min_len", "max_len", "min_repeats", "max_repeats", "item_len", "baseline", "n_tasks", "datasets",
                 "classifier", "methods", "replay_capacity", "replay_every", "replay_store", "replay_batch",
                 "replay_policy", "ewc_lambda", "ewc_samples")


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


def synthetic_entries(n: int, H: int, d: int, seed: int, chunk: int = 1 << 17, centres: int = 4096):
    """Memory entries (keys, values), each (H, m, d), chunk by chunk: keys shaped like attention keys
    (per head `centres` cluster centres with log-normal per-dimension scales and a shared offset, each key a
    centre plus noise of half its scale); values a fixed transform of the keys (a search's cost does not
    depend on them). Chunks keep a 10M-entry memory from ever being whole in RAM."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.6 * torch.randn(H, 1, d, generator=g))
    centre = torch.randn(H, centres, d, generator=g) * scale + 2 * torch.randn(H, 1, d, generator=g)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        which = torch.randint(0, centres, (H, m, 1), generator=g).expand(H, m, d)
        keys = centre.gather(1, which) + 0.5 * scale * torch.randn(H, m, d, generator=g)
        yield keys, 0.5 * keys.flip(-1)


def bench_knn_scale(model, cfg, device, dtype) -> dict:
    """Suite 'knn_scale': causal mode (KV cache), every head searching at every token, memory sizes
    knn_scale_sizes of synthetic clustered keys. Per size and backend: generation tok/s and its time
    against memory off (median of knn_scale_repeats interleaved pairs), recall@5 against exact search
    (measured at build, leave-one-out), bytes per entry and head (index; keys + values storage), index
    build time, incremental build throughput against a plain forward pass, and the time to open the
    saved folder (memory-mapped)."""
    import shutil
    H, d = model.config.n_head, model.config.n_embd // model.config.n_head
    L, n = cfg.knn_layer, cfg.gen_tokens
    knn = [0] * model.config.n_layer
    knn[L] = 5
    base = dict(knn=knn, bookkeeping_frac=0.0, mem_frac=0.0, knn_softmax_influence=1.0, knn_recompute=False,
                knn_dtype=cfg.knn_scale_dtype, knn_nlist=cfg.knn_scale_nlist, knn_hnsw_m=16, knn_tune="always")
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, cfg.prompt_len), generator=g).to(device)
    step = model.config.block_size - 1
    build_tokens = torch.randint(0, model.config.vocab_size, (cfg.knn_scale_build_tokens,), generator=g).tolist()
    windows = torch.tensor([[198] + build_tokens[i:i + step] for i in range(0, len(build_tokens), step)], device=device)
    median = lambda xs: sorted(xs)[len(xs) // 2]

    spent = [0.0, 0.0]  # seconds inside memory.search, and inside the whole hook, during the timed generation

    def gen_seconds(use_cache=True):
        gens = [torch.Generator(device=device).manual_seed(0)]
        with autocast_context(device, dtype):
            model.generate(prompt, 4, generators=gens, use_cache=use_cache)  # warm-up
            sync(device)
            spent[0] = spent[1] = 0.0
            t0 = time.perf_counter()
            model.generate(prompt, n, generators=gens, use_cache=use_cache)
            sync(device)
        return time.perf_counter() - t0

    def on_off(mem):
        """(tok/s on, tok/s off, median time ratio on / off of interleaved pairs, median of the ratio implied by
        the time inside memory.search: total / (total - search), immune to load changing between the pair)."""
        ons, offs, inside = [], [], []
        search = mem.search

        def timed_search(*a, **kw):
            t0 = time.perf_counter()
            out = search(*a, **kw)
            spent[0] += time.perf_counter() - t0
            return out

        mem.search = timed_search  # the hook calls memory.search
        hooked = []
        for _ in range(cfg.knn_scale_repeats):
            KNNMemory.detach(model)
            offs.append(gen_seconds())
            mem.attach(model)
            hook = model.attentions[L].memory

            def timed_hook(*a, **kw):  # the whole hook: search, mixing and its own attention call
                t0 = time.perf_counter()
                out = hook(*a, **kw)
                spent[1] += time.perf_counter() - t0
                return out

            timed_hook.recompute = hook.recompute
            model.attentions[L].memory = timed_hook
            ons.append(gen_seconds())
            inside.append(spent[0])
            hooked.append(spent[1])
        KNNMemory.detach(model)
        del mem.search
        return (n / median(ons), n / median(offs), median([a / b for a, b in zip(ons, offs)]),
                median([t / (t - s) for t, s in zip(ons, inside)]), median(inside) / n * 1e3,
                median([t / (t - s) for t, s in zip(ons, hooked)]), median(hooked) / n * 1e3)

    def build_speed(mem):
        """Median over pairs of (plain forward time / add_tokens time) for the same windows, and tok/s."""
        ratios, speeds = [], []
        for _ in range(cfg.knn_scale_repeats):
            with torch.no_grad():
                t0 = time.perf_counter()
                model(windows)
                t_fwd = time.perf_counter() - t0
            t0 = time.perf_counter()
            mem.add_tokens(model, build_tokens)
            mem.index(L)  # an exact torch index is rebuilt after a change: count it
            t_build = time.perf_counter() - t0
            ratios.append(t_fwd / t_build)
            speeds.append(len(build_tokens) / t_build)
        return median(speeds), median(ratios)

    rows, runs = [], []
    own_dir = not cfg.knn_scale_dir  # a temp folder of its own, removed at the end
    if own_dir:
        import tempfile
        cfg = replace(cfg, knn_scale_dir=tempfile.mkdtemp(prefix="knn_scale_"))

    def report(size, label, mem, stats, extra=None):
        info = mem.index_info.get(L, {})
        index = mem.index(L)
        item = STORAGE_ITEMSIZE[mem.dtype]
        run = {"size": size, "variant": label, "backend": mem.backend, "mode": "reference" if mem.settings.knn_recompute
               else "causal", "tokens_per_s": stats[0], "off_tokens_per_s": stats[1], "slowdown": stats[2],
               "search_ratio": stats[3], "search_ms_per_token": stats[4],
               "hook_ratio": stats[5] if len(stats) > 5 else None, "hook_ms_per_token": stats[6] if len(stats) > 5 else None, "recall_at_5": info.get("recall_at_k", 1.0), "exact": getattr(index, "exact", False),
               "nlist": info.get("nlist"), "nprobe": info.get("nprobe"), "ef_search": info.get("ef_search"),
               "refine": info.get("refine"), "index_bytes_per_entry_head": index.bytes_per_entry(),
               "kv_bytes_per_entry_head": (mem.head_size + mem.value_size) * item, "dtype": mem.dtype,
               "index_build_s": info.get("build_s"), **(extra or {})}
        runs.append(run)
        recall = "exact" if run["exact"] else f"{run['recall_at_5']:.3f}"
        build = f"{run['build_tok_s']:,.0f} tok/s ({run['build_ratio']:.2f}x fwd)" if "build_tok_s" in run else "-"
        opened = f"{run['open_s']:.2f} s" if "open_s" in run else "-"
        row = (f"{size:>10,}", f"{label[:22]:<22}", f"{run['mode']:<9}", f"{stats[0]:6.1f}", f"{stats[2]:5.2f}x",
               f"{stats[4]:6.2f} ms {stats[3]:5.2f}x" + (f" | hook {stats[6]:6.2f} ms {stats[5]:5.2f}x" if len(stats) > 5
                                                          else " | -"), f"{recall:>6}",
               f"{run['index_bytes_per_entry_head']:6.1f} + {run['kv_bytes_per_entry_head']}",
               f"{(info.get('build_s') or 0):6.1f} s", build, opened)
        print(" | ".join(row), flush=True)
        rows.append(row)

    def scaled_rows(size):
        """A memory of knn_scale_heads heads: its index, recall, bytes, open time measured; per token, one
        probe per model head (spread over its heads) searched n times and timed; memory-side build time
        scaled by H / heads. Ratios are implied: (plain decoding step + search) / plain decoding step."""
        mh = cfg.knn_scale_heads
        folder = os.path.join(cfg.knn_scale_dir, f"m{size}h{mh}")
        shutil.rmtree(folder, ignore_errors=True)
        mem = KNNMemory(KNNSettings(**base), [L], mh, d, "bench", {}, 198, device,
                        storage_dir=folder if size >= cfg.knn_scale_disk_from else None)
        t0 = time.perf_counter()
        mem.reserve(size + len(build_tokens) * cfg.knn_scale_repeats)
        for keys, values in synthetic_entries(size, mh, d, cfg.seed):
            mem.add_entries({L: keys}, {L: values})
        extra = {"fill_s": time.perf_counter() - t0, "heads_built": mh}
        mem.index(L)
        ratios, speeds = [], []
        for keys, values in synthetic_entries(len(build_tokens) * cfg.knn_scale_repeats, mh, d, cfg.seed + 1,
                                              chunk=len(build_tokens)):
            with torch.no_grad():
                t0 = time.perf_counter()
                model(windows[:, :len(build_tokens) + 1])
                t_fwd = time.perf_counter() - t0
            t0 = time.perf_counter()
            mem.add_entries({L: keys}, {L: values})
            t_mem = (time.perf_counter() - t0) * H / mh
            ratios.append(t_fwd / (t_fwd + t_mem))
            speeds.append(len(build_tokens) / (t_fwd + t_mem))
        extra["build_tok_s"], extra["build_ratio"] = median(speeds), median(ratios)
        mem.save(folder)
        # load checks the model's heads: a stand-in with this memory's heads (force: its weights are not the model's)
        shape = dict(asdict(model.config), n_head=mh, n_embd=mh * d, block_size=8, vocab_size=16)
        stand_in = GPT(GPTConfig(**shape))
        t0 = time.perf_counter()
        mem = KNNMemory.load(folder, stand_in, KNNSettings(**base), force=True)
        extra["open_s"] = time.perf_counter() - t0
        extra["folder_bytes"] = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        heads = torch.arange(H) % mh
        rows_ = torch.randint(0, len(mem), (n, H), generator=g)
        probes = mem.keys[L][heads, rows_].float() + 0.1 * torch.randn(n, H, d, generator=g)  # (n, H, d)
        mem.search(L, heads, probes[0], 5)  # warm-up
        searches, offs = [], []
        for _ in range(cfg.knn_scale_repeats):
            offs.append(gen_seconds())
            t0 = time.perf_counter()
            for t in range(n):
                mem.search(L, heads, probes[t], 5)
            searches.append(time.perf_counter() - t0)
        t_off, t_s = median(offs), median(searches)
        implied = (t_off + t_s) / t_off
        report(size, f"auto ({mem.backend}) {mh}/{H} heads", mem,
               (n / (t_off + t_s), n / t_off, implied, implied, t_s / n * 1e3), extra)
        del mem
        shutil.rmtree(folder, ignore_errors=True)

    header = ("entries", "backend", "mode", "tok/s", "vs off", "search/token, implied | whole hook/token, implied", "rec@5", "B/entry/head idx+kv", "index", "build (incremental)",
              "open")
    print(" | ".join(header), flush=True)
    for size in cfg.knn_scale_sizes:
        if 0 < cfg.knn_scale_heads < H:
            scaled_rows(size)
            continue
        on_disk = size >= cfg.knn_scale_disk_from
        folder = os.path.join(cfg.knn_scale_dir, f"m{size}")
        shutil.rmtree(folder, ignore_errors=True)
        settings = KNNSettings(**base)
        mem = KNNMemory(settings, [L], H, d, "bench", {}, 198, device, storage_dir=folder if on_disk else None)
        t0 = time.perf_counter()
        mem.reserve(size + 3 * len(build_tokens) * cfg.knn_scale_repeats)
        for keys, values in synthetic_entries(size, H, d, cfg.seed):
            mem.add_entries({L: keys}, {L: values})
        fill_s = time.perf_counter() - t0
        mem.index(L)
        variants = [("auto", {})]
        if size <= cfg.knn_scale_exact_max and getattr(mem.index(L), "exact", False) is False:
            variants.append(("faiss-flat", {"knn_backend": "faiss-flat"}))
        if size == cfg.knn_scale_compare_at:
            variants += [(b, {"knn_backend": b}) for b in cfg.knn_scale_compare]
        if size in (cfg.knn_scale_sizes[0], cfg.knn_scale_compare_at):
            variants.append(("auto", {"knn_recompute": True}))
        # the 'auto' memory: incremental build speed, then save + open (memory-mapped) timed
        extra = {"fill_s": fill_s}
        extra["build_tok_s"], extra["build_ratio"] = build_speed(mem)
        mem.save(folder)
        t0 = time.perf_counter()
        opened = KNNMemory.load(folder, model, KNNSettings(**base), force=True)
        extra["open_s"] = time.perf_counter() - t0
        extra["folder_bytes"] = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        mem = opened if on_disk else mem  # beyond RAM: generate from the mapped folder
        for label, change in variants:
            if label == "auto" and not change:
                m = mem
            else:
                m = KNNMemory.__new__(KNNMemory)
                m.__dict__.update(mem.__dict__)  # the same storage, another backend or mode
                m.settings, m._indexes, m.index_info, m._dead = KNNSettings(**{**base, **change}), {}, {}, {}
                m.index(L)
            report(size, f"{label} ({m.backend})" if label == "auto" else label, m, on_off(m),
                   extra if m is mem else None)
        del mem, opened
        shutil.rmtree(folder, ignore_errors=True)
    print_table([(" | ".join(r[:2]), r[3], " | ".join(r[2:3] + r[4:])) for r in rows], "tok/s")
    if own_dir:
        shutil.rmtree(cfg.knn_scale_dir, ignore_errors=True)
    return {"runs": runs, "columns": header, "gen_tokens": n, "layer": L, "heads": H, "head_size": d}


STORAGE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def memory_model(cfg, vocab_size, device, **memories):
    """A GPT of cfg's shape (seed cfg.seed) with the trainable memories asked for (memory.MemoryConfig
    settings), each batch row's memorizing memory full of random entries, so every step searches
    knn_memory_size entries per row and head: the cost of a long document's end (it depends on the size,
    not the content)."""
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias, pos=cfg.pos))
    model = attach_memories(model, MemoryConfig(**memories)).to(device)
    mem = memorizing_layer(model)
    if mem is not None:
        mem.reset(cfg.batch_size)
        mem._alloc(cfg.batch_size, torch.zeros(1, device=device))
        k = torch.randn(cfg.batch_size, cfg.n_head, cfg.knn_memory_size, cfg.n_embd // cfg.n_head, device=device)
        mem.append(torch.arange(cfg.batch_size, device=device), k, torch.randn_like(k))
    if mnm_block(model) is not None:
        mnm_block(model).reset(cfg.batch_size)
    return model


def bench_memorizing(cfg, device, dtype, vocab_size) -> tuple[dict, list]:
    """Training with a memorizing layer (memory full: every step searches knn_memory_size entries per row
    and head, then appends its window) vs without; kNN-LM scoring vs plain scoring."""
    rows, res = Rows(), {}
    if not 0 <= cfg.knn_layer < cfg.n_layer:
        raise ConfigError(f"suite 'memorizing' needs 0 <= knn_layer < n_layer={cfg.n_layer}, got {cfg.knn_layer}")
    speed = {}
    layer = dict(knn_layer=cfg.knn_layer, knn_topk=cfg.knn_topk, knn_memory_size=cfg.knn_memory_size)
    for label, extra in (("plain", {}), ("memorizing", layer),
                         ("memorizing_bf16", {**layer, "knn_search_dtype": "bfloat16"})):
        speed[label] = bench_training(memory_model(cfg, vocab_size, device, **extra), cfg, device, dtype)
    slowdown = {k: speed["plain"]["tokens_per_s"] / speed[k]["tokens_per_s"] for k in ("memorizing", "memorizing_bf16")}
    res["train"] = {**speed, "slowdown": slowdown["memorizing"], "slowdown_bf16_search": slowdown["memorizing_bf16"]}
    rows.append((f"train (batch {cfg.batch_size} x {cfg.block_size}), no memory", f"{speed['plain']['tokens_per_s']:,.0f} tok/s",
                 f"{speed['plain']['ms_per_iter']:.1f} ms/iter"))
    for key, search in (("memorizing", "float32"), ("memorizing_bf16", "bfloat16")):
        rows.append((f"train, memorizing layer {cfg.knn_layer}, {cfg.knn_memory_size:,} entries, top {cfg.knn_topk}, "
                     f"{search} search", f"{speed[key]['tokens_per_s']:,.0f} tok/s",
                     f"{slowdown[key]:.2f}x the time of no memory"))

    model = memory_model(cfg, vocab_size, device).eval()
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
    mnm_layer (-1: layer n_layer // 2), written every step like a document's next window."""
    rows, speed = Rows(), {}
    mid = cfg.n_layer // 2
    knn_layer = cfg.knn_layer if 0 <= cfg.knn_layer < cfg.n_layer else mid
    mnm_layer = cfg.mnm_layer if cfg.mnm_layer >= 0 else mid
    grads = (f", grad_windows {cfg.knn_grad_windows}" if cfg.knn_grad_windows else "") + (", joint" if cfg.knn_mix == "joint" else "")
    mnm_extra = ((f", grad_windows {cfg.mnm_grad_windows}" if cfg.mnm_grad_windows else "") + (", pooled" if cfg.mnm_pool else "")
                 + (", shifted" if cfg.mnm_shift else "") + (", token values" if cfg.mnm_value == "token" else "")
                 + (", tied keys" if cfg.mnm_tie_keys else ""))
    arms = (("no memory", {}),
            (f"memorizing layer {knn_layer}, {cfg.knn_memory_size:,} entries, top {cfg.knn_topk}{grads}",
             dict(knn_layer=knn_layer, knn_topk=cfg.knn_topk, knn_memory_size=cfg.knn_memory_size,
                  knn_grad_windows=cfg.knn_grad_windows, knn_mix=cfg.knn_mix)),
            (f"MNM block {mnm_layer} ({cfg.mnm_write}, {cfg.mnm_heads} heads, hidden {cfg.mnm_hidden}{mnm_extra})",
             dict(mnm_layer=mnm_layer, mnm_heads=cfg.mnm_heads, mnm_key_size=cfg.mnm_key_size,
                  mnm_hidden=cfg.mnm_hidden, mnm_write=cfg.mnm_write, mnm_grad_windows=cfg.mnm_grad_windows,
                  mnm_pool=cfg.mnm_pool, mnm_shift=cfg.mnm_shift, mnm_value=cfg.mnm_value,
                  mnm_tie_keys=cfg.mnm_tie_keys)))
    for label, extra in arms:
        speed[label] = bench_training(memory_model(cfg, vocab_size, device, **extra), cfg, device, dtype)
        ratio = speed["no memory"]["tokens_per_s"] / speed[label]["tokens_per_s"]
        speed[label]["slowdown"] = ratio
        rows.append((f"train (batch {cfg.batch_size} x {cfg.block_size}), {label}",
                     f"{speed[label]['tokens_per_s']:,.0f} tok/s",
                     f"{speed[label]['ms_per_iter']:.1f} ms/iter" + (f", {ratio:.2f}x the time of no memory" if extra else "")))
    for label, extra in arms:
        read = bench_reading(memory_model(cfg, vocab_size, device, **extra), cfg, device, windows=17)
        speed[label]["eval_tokens_per_s"] = read
        ratio = speed["no memory"]["eval_tokens_per_s"] / read
        rows.append((f"evaluate (batch {cfg.batch_size}, 17 windows: 16 in memory), {label}", f"{read:,.0f} tok/s",
                     f"{ratio:.2f}x the time of no memory" if extra else ""))
    return speed, rows


@torch.no_grad()
def bench_reading(model, cfg, device, windows: int) -> float:
    """Tokens/s of reading a document of `windows` windows as the evaluation does (no gradients), every
    row's memories starting empty, so the last window reads windows - 1 windows of memory."""
    model.eval()
    T, B = model.config.block_size, cfg.batch_size
    x = torch.randint(0, model.config.vocab_size, (B, windows * T), device=device)

    def read():
        for m in row_memories(model).values():
            m.reset(B)
        for w in range(windows):
            model(x[:, w * T:(w + 1) * T])
        sync(device)

    return B * windows * T / timed(read, max(1, cfg.bench_iters // windows))


def bench_smollm2(cfg, device, dtype) -> tuple[dict, list]:
    """Suite 'smollm2': greedy generation of gen_tokens tokens after a random prompt of prompt_len tokens
    (KV cache, batch sizes gen_batch_sizes) by the pretrained model cfg.pretrained: transformers' own
    LlamaForCausalLM.generate on the same weights (what a user would otherwise run), ours with the memory
    off, and ours with a kNN memory of each size in knn_sizes (entries per layer and key/value head, the
    settings of knn_config). The smallest memory holds the model's own keys and values of random tokens;
    larger ones tile them with a little noise (search cost depends on the size, not the content). Each time
    is the best of bench_iters runs, the variants interleaved, so CPU time taken by other jobs shows as
    noise rather than as a bias against one variant."""
    from transformers import LlamaForCausalLM
    model = GPT.from_pretrained(cfg.pretrained).to(device).eval()
    folder = gguf_folder(cfg.pretrained) if cfg.pretrained in PACKAGED_GGUF or cfg.pretrained.endswith(".gguf") \
        else cfg.pretrained
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    names = {f.name for f in fields(KNNSettings)}
    settings = KNNSettings(**{k: v for k, v in read_config_file(cfg.knn_config).items() if k in names})
    settings = replace(settings, knn_recompute=False)  # causal mode: the KV cache stays valid
    meta = pretrained_tokenizer_meta(cfg.pretrained, model)
    tokenizer = get_tokenizer(meta)
    g = torch.Generator().manual_seed(cfg.seed)
    V, n = model.config.vocab_size, cfg.gen_tokens
    base = KNNMemory.create(model, settings, meta, tokenizer)
    base.add_tokens(model, torch.randint(0, V, (min(cfg.knn_sizes),), generator=g).tolist())
    memories = {}
    for size in cfg.knn_sizes:
        mem = KNNMemory.create(model, settings, meta, tokenizer)
        reps = -(-size // len(base))

        def tile(x):  # (H, len(base), d) -> (H, size, d)
            return x if size <= len(base) else \
                x.repeat(1, reps, 1)[:, :size] + 0.05 * x.std() * torch.randn(x.size(0), size, x.size(2), generator=g)
        mem.add_entries({L: tile(base.keys[L][:, :size]) for L in mem.layers},
                        {L: tile(base.values[L][:, :size]) for L in mem.layers})
        for L in mem.layers:
            mem.index(L)  # built before timing: the build is what suite 'knn_scale' measures
        memories[size] = mem
    res = {"model": cfg.pretrained, "layers": settings.layers, "settings": asdict(settings), "runs": []}
    rows = Rows()
    for batch in cfg.gen_batch_sizes:
        prompt = torch.randint(0, V, (batch, cfg.prompt_len), generator=g).to(device)

        def ours(mem=None):
            KNNMemory.detach(model)
            if mem is not None:
                mem.attach(model)
            try:
                return model.generate(prompt, n, temperature=0.0)
            finally:
                KNNMemory.detach(model)

        def theirs():
            return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                               pad_token_id=0)

        variants = {"transformers": theirs, "off": ours, **{size: partial(ours, m) for size, m in memories.items()}}
        with torch.no_grad(), autocast_context(device, dtype):
            same = torch.equal(ours(), theirs())  # a warm-up, and a check that both run the same model
            best = {k: float("inf") for k in variants}
            for _ in range(cfg.bench_iters):
                for k, fn in variants.items():
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    best[k] = min(best[k], time.perf_counter() - t0)
        tok_s = {k: batch * n / t for k, t in best.items()}
        run = {"batch": batch, "greedy_tokens_equal": same, "tokens_per_s": {str(k): v for k, v in tok_s.items()},
               "ours_vs_transformers_speed": best["transformers"] / best["off"],
               "memory_time_ratio": {str(s): best[s] / best["off"] for s in memories}}
        res["runs"].append(run)
        rows.append((f"batch {batch}: transformers generate", f"{tok_s['transformers']:,.1f} tok/s", "greedy, KV cache"))
        rows.append((f"batch {batch}: ours, memory off", f"{tok_s['off']:,.1f} tok/s",
                     f"{run['ours_vs_transformers_speed']:.2f}x transformers' speed; same tokens: {same}"))
        for s, m in memories.items():
            rows.append((f"batch {batch}: ours, memory {s:,} entries ({m.backend})", f"{tok_s[s]:,.1f} tok/s",
                         f"{best[s] / best['off']:.2f}x the time of memory off"))
    return res, rows


# -----------------------------------------------------------------------------
# DNC: memory.DNC against a step-serial reference of the same size

def naive_dnc_forward(dnc, x):
    """The DNC's documented equations written out one sample and one read head at a time, the
    way a straightforward port does it: the speed baseline for memory.DNC, and an independent
    check of its numbers in the tests. Shares dnc's controller and layers; dense links only."""
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
    if cfg.suite == ["smollm2"]:  # a pretrained model, not a random one of the config's shape
        print(f"{torch.get_num_threads()} CPU threads")
        res, rows = bench_smollm2(cfg, device, dtype)
        print_table(rows, "throughput")
        result = {"settings": asdict(cfg), "device": device, "dtype": dtype, "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "smollm2": res}
        write_result(result, cfg.bench_json)
        return result
    vocab_size = cfg.vocab_size
    if vocab_size is None:
        meta_path = os.path.join(cfg.data_dir, cfg.dataset, "meta.json")
        vocab_size = json.load(open(meta_path))["vocab_size"] if os.path.isfile(meta_path) else 50257
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias, pos=cfg.pos)).to(device)
    print(f"model: {model.get_num_params() / 1e6:.2f}M parameters on {device} ({dtype}), "
          f"{torch.get_num_threads()} CPU threads")
    unknown = set(cfg.suite) - set(SUITES)
    if unknown:
        raise ConfigError(f"unknown suite {sorted(unknown)}; choose from {', '.join(SUITES)}")
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
    if "knn_scale" in cfg.suite:
        result["knn_scale"] = bench_knn_scale(model, cfg, device, dtype)
    if rows:
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
    cli(main, lambda: load_config(BenchConfig, ignore=TRAINING_ONLY), (ConfigError,))
