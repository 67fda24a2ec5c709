"""
The GPT language model: GPT-2 compatible (parameter names, shapes, numerics), with a KV cache
for generation and one documented seam in attention where a memory plugs in.

Parameter names follow GPT-2 / nanoGPT (transformer.wte, transformer.h.0.attn.c_attn, ...) so
pretrained weights map by name; Hugging Face stores four of them (the Conv1D layers) transposed.

The memory seam
---------------
Every CausalSelfAttention has an attribute `memory` (None by default). When set, attention calls

    y = memory(attn, q, k, v, attend)      # q: (B, nh, T, hs); k, v: (B, nh, Tk, hs)

instead of `y = attend(q, k, v)`. q holds the queries of the T new tokens, k and v the keys and
values of the whole visible context (cached past + new, Tk >= T), all split into heads and
before any memory touched them; `attend(q, k, v)` is the layer's own causal attention and
returns (B, nh, T, hs). A memory may read q/k/v, replace any of them (e.g. swap in retrieved
values) and call `attend`, or compute y its own way (e.g. mix attend's output with attention
over retrieved pairs). The KV cache always stores the *unmodified* k and v, so a memory that
rewrites past values sees the original ones again at the next step. `attn.layer_idx` tells
the memory which layer it is at. A memory whose changes reach back to earlier positions
(their outputs depend on the newest token) sets `memory.recompute = True`; generation then
caches only the layers below it, see KVCache. A memory that is an nn.Module (learned gates) becomes part of
the model's parameters and state_dict; a plain callable (a kNN store) does not.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2


class KVCache:
    """Keys and values of the tokens seen so far, preallocated to block_size.

    With recompute_from=L, only layers below L are cached; the cache also keeps the residual
    stream entering layer L for every position, and layers L.. are recomputed over the whole
    context at every step. That is what a memory needs whose effect on *earlier* positions
    changes with each new token (the kNN memory re-chooses which values to replace from the
    newest token's attention): decoding then still equals full recomputation, at the price of
    running the upper layers over the whole context.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype, recompute_from: int | None = None):
        hs = config.n_embd // config.n_head
        self.recompute_from = recompute_from
        self.n_cached = config.n_layer if recompute_from is None else recompute_from
        shape = (self.n_cached, batch_size, config.n_head, config.block_size, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.x = None
        if recompute_from is not None:
            self.x = torch.zeros(batch_size, config.block_size, config.n_embd, device=device, dtype=dtype)
        self.pos = 0  # tokens already stored (same for every layer once a forward pass is done)

    def update(self, layer: int, k, v):
        """Store the new (B, nh, T, hs) keys/values of `layer`; return the whole context's."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def update_resid(self, x):
        """Store the new (B, T, C) inputs of layer recompute_from; return the whole context's."""
        end = self.pos + x.size(1)
        self.x[:, self.pos:end] = x
        return self.x[:, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer_idx = layer_idx
        self.memory = None  # the seam, see the module docstring
        self.causal = True  # False in a seq2seq encoder: every token sees the whole (unpadded) input

    def attend(self, q, k, v, mask=None):
        """Causal attention of the T newest queries over all Tk keys: (B, nh, T, hs). Without
        self.causal, bidirectional attention where mask (B, 1, 1, Tk), True = a real token, hides padding."""
        T, Tk = q.size(2), k.size(2)
        dropout_p = self.attn_dropout if self.training else 0.0
        if not self.causal:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        if T == Tk:  # no cached past: the usual lower-triangular mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        # with a cached past, query i sits at position Tk - T + i; SDPA's is_causal would align
        # the mask top-left instead, so build it explicitly (a single new token sees everything)
        mask = None
        if T > 1:
            mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def forward(self, x, cache: KVCache | None = None, mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, Tk, hs)
        if mask is not None:
            y = self.attend(q, k, v, mask)
        elif self.memory is None:
            y = self.attend(q, k, v)
        else:
            y = self.memory(self, q, k, v, self.attend)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache: KVCache | None = None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


def init_weights(module):
    """GPT-2's init: N(0, 0.02) for Linear and Embedding weights, zero biases."""
    if isinstance(module, nn.Linear):
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on 2-D tensors only (matmul weights, embeddings), never on
    biases and LayerNorm gains; fused kernel on CUDA when this torch has it."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = dict(fused=True) if fused else dict()
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


def scale_residual_init(model, n_layer):
    """GPT-2 scales the init of residual projections by 1/sqrt(number of residual layers)."""
    for pn, p in model.named_parameters():
        if pn.endswith("c_proj.weight"):
            torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


# Peak dense bf16/fp16 tensor-core FLOP/s by GPU name (the vendors' datasheets, without
# sparsity). Matched as substrings of torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("A6000", 155e12),
    ("V100", 125e12), ("T4", 65e12),
]


def peak_flops(device_name: str | None, dtype: str) -> float | None:
    """Peak FLOP/s for this device and compute dtype, or None when we do not know it (CPU,
    float32 math, unlisted GPUs): an unknown MFU is better than a wrong one."""
    if device_name is None or dtype not in ("bfloat16", "float16"):
        return None
    if dtype == "bfloat16" and ("V100" in device_name or "T4" in device_name):
        return None  # no bf16 tensor cores before Ampere
    for key, flops in PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: https://paperswithcode.com/method/weight-tying
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(init_weights)
        scale_residual_init(self, config.n_layer)
        # arguments of the trainable memories memory.py attaches from outside (a memorizing layer, an MNM
        # block); checkpoints keep them beside the model's own arguments
        self.memory_args = {}

    def get_num_params(self, non_embedding=True):
        """Parameter count; position embeddings are left out by default, as in the
        scaling-law convention (token embeddings count once, as lm_head)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    @property
    def attentions(self) -> list[CausalSelfAttention]:
        """The attention module of every layer: where memories are attached (`.memory`)."""
        return [block.attn for block in self.transformer.h]

    def forward(self, idx, targets=None, cache: KVCache | None = None):
        """idx (B, T) token ids. With targets (B, T): returns (logits (B, T, V), mean cross
        entropy; targets of -1 are ignored). Without: logits of the last position only,
        (B, 1, V), which is all generation needs. With a cache, idx holds only the new tokens
        and positions continue from cache.pos."""
        device = idx.device
        b, t = idx.size()
        start = cache.pos if cache is not None else 0
        if start + t > self.config.block_size:
            raise ValueError(f"cannot forward {start + t} tokens, block_size is {self.config.block_size}")
        pos = torch.arange(start, start + t, dtype=torch.long, device=device)  # (t,)

        tok_emb = self.transformer.wte(idx)  # (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for i, block in enumerate(self.transformer.h):
            if cache is not None and i == cache.recompute_from:
                x = cache.update_resid(x)  # (b, start + t, n_embd): layers from here see every position
            x = block(x, cache if cache is not None and i < cache.n_cached else None)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.pos += t

        if targets is not None:
            assert cache is None, "training and scoring run without a cache"
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, [-1], :]), None

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. load GPT-2 with 1024 positions, train with 256)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path: str, dropout: float = 0.0):
        """GPT-2 weights from Hugging Face: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'
        (downloaded when online) or a local folder written by `save_pretrained`."""
        from transformers import GPT2LMHeadModel
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        except OSError as e:
            raise OSError(f"could not load GPT-2 weights '{name_or_path}': {e}\n"
                          "offline? pass a local folder written by GPT2LMHeadModel.save_pretrained") from None
        hc = hf.config
        # numerics this model does not reproduce: refuse instead of giving subtly different logits
        unsupported = {
            "activation_function": (hc.activation_function, "gelu_new"),
            "scale_attn_weights": (hc.scale_attn_weights, True),
            "scale_attn_by_inverse_layer_idx": (hc.scale_attn_by_inverse_layer_idx, False),
            "layer_norm_epsilon": (hc.layer_norm_epsilon, 1e-5),
        }
        for key, (got, want) in unsupported.items():
            if got != want:
                raise ValueError(f"{name_or_path}: GPT-2 config has {key}={got!r}, this model supports only {want!r}")
        config = GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                           n_head=hc.n_head, n_embd=hc.n_embd, dropout=dropout, bias=True)
        model = GPT(config)
        sd = model.state_dict()
        sd_hf = hf.state_dict()
        # HF's Conv1D keeps (in, out) weights, nn.Linear (out, in)
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        keys = [k for k in sd_hf if not k.endswith((".attn.bias", ".attn.masked_bias"))]  # old HF buffers
        missing = set(sd) - set(keys)
        if missing:
            raise ValueError(f"{name_or_path}: checkpoint lacks {sorted(missing)[:4]}")
        with torch.no_grad():
            for k in keys:
                if k not in sd:
                    raise ValueError(f"{name_or_path}: unexpected parameter {k}")
                src = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
                if src.shape != sd[k].shape:
                    raise ValueError(f"{name_or_path}: {k} has shape {tuple(src.shape)}, expected {tuple(sd[k].shape)}")
                sd[k].copy_(src)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return configure_optimizers(self, weight_decay, learning_rate, betas, device_type)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_sec: float, device_name: str | None, dtype: str) -> float | None:
        """Model FLOPs utilisation as a fraction of the device's peak, None when the peak
        is unknown (CPU, float32, unlisted GPU)."""
        peak = peak_flops(device_name, dtype)
        if peak is None:
            return None
        return self.flops_per_token() * tokens_per_sec / peak

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 stop_token=None, generators=None, use_cache=True):
        """Continue each row of idx (B, T) by max_new_tokens tokens; returns (B, T + n).

        temperature 0 is greedy. Row i samples with generators[i] (a torch.Generator), so a
        row gives the same tokens whether it runs alone or in a batch. Rows that produced
        stop_token are padded with it; generation ends early once every row has. When the
        context outgrows block_size it is cropped to the last block_size tokens; positions
        then shift every step, so from there on each step is one full forward pass of the
        cropped window (exactly what recomputation would do, with no cache benefit).
        """
        B = idx.size(0)
        block_size = self.config.block_size
        # memories that rewrite earlier positions (memory.recompute) need the layers from the
        # first of them recomputed over the whole context, see KVCache
        recompute = [a.layer_idx for a in self.attentions if getattr(a.memory, "recompute", False)]
        recompute_from = min(recompute) if recompute else None
        cache = None
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block_size:])
            elif cache is None or cache.pos + 1 > block_size:
                # (re)fill the cache with the visible window
                param = next(self.parameters())
                cache = KVCache(self.config, B, idx.device, param.dtype, recompute_from)
                logits, _ = self(idx[:, -block_size:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            idx, finished = append_next(idx, logits[:, -1, :], done, temperature, top_k, top_p, stop_token, generators)
            if finished:
                break
        return idx


def append_next(idx, logits, done, temperature, top_k, top_p, stop_token, generators):
    """Append each row's next token, drawn from logits (B, V), to idx; a row that produced stop_token
    (done, updated in place) is padded with it. Returns (idx, whether every row is done)."""
    idx_next = sample_next(logits, temperature, top_k, top_p, generators)
    if stop_token is not None:
        idx_next = torch.where(done[:, None], torch.full_like(idx_next, stop_token), idx_next)
        done |= idx_next[:, 0] == stop_token
    return torch.cat((idx, idx_next), dim=1), stop_token is not None and bool(done.all())


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generators=None):
    """Next token per row from logits (B, V): greedy when temperature == 0, else sample from
    softmax(logits / temperature) restricted to the top_k tokens and/or the smallest set whose
    probability reaches top_p. Returns (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        v, _ = torch.topk(logits, top_k)
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, -float("inf"))
    probs = F.softmax(logits, dim=-1)
    if generators is None:
        return torch.multinomial(probs, num_samples=1)
    assert len(generators) == probs.size(0), "one generator per row"
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])[:, None]


# -----------------------------------------------------------------------------
