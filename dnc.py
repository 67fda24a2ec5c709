"""
Differentiable neural computer (Graves et al., Nature 538:471, 2016).

The equations are in docs/dnc-and-replay.md; each step here follows them in order: content
addressing, usage and retention, allocation, write weighting, erase then add, precedence and
temporal links, then the reads (backward, content, forward modes) on the memory after the write.
Everything is batched and vectorised over heads and slots: the only Python loop is over time,
which the recurrence makes inherent.

    dnc = DNC(DNCConfig(input_size=9, output_size=8, memory_slots=32, word_size=16, read_heads=1))
    y, state = dnc(x)            # x (B, T, 9) -> y (B, T, 8); state: a dict of tensors
    y2, state = dnc(x2, state)   # carry the memory on to the next sequence
    save_dnc_state(state, "mem.pt"); state = load_dnc_state("mem.pt", dnc)
"""

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from common import atomic_save
from model import Block, GPTConfig

DNC_EPS = 1e-6  # keeps square roots and products away from exact zeros, whose gradients blow up


@dataclass
class DNCConfig:
    input_size: int
    output_size: int
    memory_slots: int = 16  # N
    word_size: int = 16  # W
    read_heads: int = 4  # R (there is always one write head)
    controller: str = "lstm"  # 'lstm' (the reference) or 'gpt': a GPT block over its last `window` steps
    hidden_size: int = 64  # LSTM units, or the GPT block's width
    n_head: int = 4  # attention heads of the 'gpt' controller
    window: int = 64  # steps the 'gpt' controller attends over
    sparse_links: int = 0  # K > 0: sparse temporal links (top-K write weights and precedence, K links per slot)

    def __post_init__(self):
        for name in ("input_size", "output_size", "memory_slots", "word_size", "read_heads", "hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DNC {name} must be at least 1, got {getattr(self, name)}")
        if self.controller not in ("lstm", "gpt"):
            raise ValueError(f"DNC controller must be 'lstm' or 'gpt', got {self.controller!r}")
        if self.controller == "gpt" and (self.hidden_size % self.n_head or self.window < 1):
            raise ValueError(f"the 'gpt' controller needs hidden_size ({self.hidden_size}) divisible by n_head "
                             f"({self.n_head}) and window >= 1 (got {self.window})")
        if not 0 <= self.sparse_links <= self.memory_slots:
            raise ValueError(f"sparse_links must be between 0 (dense links) and memory_slots ({self.memory_slots}), "
                             f"got {self.sparse_links}")

    @property
    def interface_size(self) -> int:
        R, W = self.read_heads, self.word_size
        return R * W + 3 * W + 5 * R + 3


def oneplus(x):
    return 1 + F.softplus(x)


def split_interface(xi, R: int, W: int) -> dict:
    """The interface vector (B, R*W + 3W + 5R + 3) cut in the documented order, each part
    squashed into its range: strengths >= 1, gates and erase in (0, 1), modes a softmax."""
    sizes = [R * W, R, W, 1, W, W, R, 1, 1, 3 * R]
    rk, rs, wk, ws, erase, wv, free, ag, wg, modes = xi.split(sizes, dim=-1)
    B = xi.size(0)
    return {
        "read_keys": rk.view(B, R, W),
        "read_strengths": oneplus(rs),  # (B, R)
        "write_key": wk,  # (B, W)
        "write_strength": oneplus(ws),  # (B, 1)
        "erase": torch.sigmoid(erase),  # (B, W)
        "write_vector": wv,  # (B, W)
        "free_gates": torch.sigmoid(free),  # (B, R)
        "alloc_gate": torch.sigmoid(ag),  # (B, 1)
        "write_gate": torch.sigmoid(wg),  # (B, 1)
        "read_modes": torch.softmax(modes.view(B, R, 3), dim=-1),  # (B, R, 3): backward, content, forward
    }


def content_weights(memory, keys, strengths):
    """C(M, k, beta): softmax over slots of beta * cos(k, M[i]). memory (B, N, W), keys (B, H, W),
    strengths (B, H) -> (B, H, N)."""
    dot = keys @ memory.transpose(1, 2)  # (B, H, N)
    # sqrt(x + eps), not sqrt(x): a fresh memory's rows are all zero, where sqrt has an infinite gradient
    key_norm = torch.sqrt((keys * keys).sum(-1) + DNC_EPS)  # (B, H)
    mem_norm = torch.sqrt((memory * memory).sum(-1) + DNC_EPS)  # (B, N)
    cos = dot / (key_norm[:, :, None] * mem_norm[:, None, :])
    return torch.softmax(strengths[:, :, None] * cos, dim=-1)


def allocation_weights(usage):
    """a[phi[j]] = (1 - u[phi[j]]) * prod_{i<j} u[phi[i]], phi the slots sorted by ascending usage.
    usage (B, N) -> (B, N). The sort's permutation carries no gradient; the usages do."""
    u = DNC_EPS + (1 - DNC_EPS) * usage  # no exact zeros in the product
    sorted_u, phi = torch.sort(u, dim=-1, stable=True)  # (B, N), ascending
    before = torch.cumprod(torch.cat([torch.ones_like(sorted_u[:, :1]), sorted_u[:, :-1]], dim=-1), dim=-1)
    return torch.zeros_like(u).scatter(-1, phi, (1 - sorted_u) * before)


class _DenseLinkUpdate(torch.autograd.Function):
    """L[i,j] = (1 - w[i] - w[j]) L[i,j] + w[i] p_prev[j], diagonal 0, with a written-out backward.
    At large N the N x N sweeps are the whole cost; autograd would keep an extra N x N tensor per
    step and sweep more of them. This keeps only the old links (which the reads keep anyway)."""

    @staticmethod
    def forward(ctx, link, precedence, w):
        new = torch.baddbmm(link * (1 - w[:, :, None] - w[:, None, :]), w[:, :, None], precedence[:, None, :])
        new.diagonal(dim1=1, dim2=2).zero_()
        ctx.save_for_backward(link, precedence, w)
        return new

    @staticmethod
    def backward(ctx, g):
        link, precedence, w = ctx.saved_tensors
        g_diag = g.diagonal(dim1=1, dim2=2)  # (B, N): these outputs are fixed at 0, their gradients go nowhere
        g_link = g * (1 - w[:, :, None] - w[:, None, :])
        g_link.diagonal(dim1=1, dim2=2).zero_()
        g_keep = g * link  # d/d(keep[i,j]); keep = 1 - w[i] - w[j]
        g_keep.diagonal(dim1=1, dim2=2).zero_()
        g_w = (g @ precedence[:, :, None])[:, :, 0] - g_diag * precedence - g_keep.sum(2) - g_keep.sum(1)
        g_precedence = (w[:, None, :] @ g)[:, 0] - g_diag * w
        return g_link, g_precedence, g_w


def dense_link_update(link, precedence, write_w):
    """L[i,j] = (1 - w[i] - w[j]) L[i,j] + w[i] p_prev[j], diagonal 0. link (B, N, N)."""
    return _DenseLinkUpdate.apply(link, precedence, write_w)


def dense_link_reads(link, read_w):
    """Forward f = L w and backward b = L^T w for every head: read_w (B, R, N) -> two (B, R, N).
    Both as products with the links untransposed, whose backward then copies no N x N tensor."""
    return (link @ read_w.transpose(1, 2)).transpose(1, 2), read_w @ link


def sparse_link_update(idx, val, precedence, write_w):
    """The link update with only the top-K write weights and precedences kept (the rest taken as 0)
    and each slot keeping its K strongest links: row i of L is L[i, idx[i, k]] = val[i, k].
    idx (B, N, K) long, val (B, N, K). Memory and time are O(N K) instead of O(N^2); with K = N
    the result equals the dense update exactly."""
    B, N, K = idx.shape
    w_top, w_at = write_w.topk(K, dim=-1)  # (B, K)
    w = torch.zeros_like(write_w).scatter(-1, w_at, w_top)  # (B, N), sparse
    p_top, p_at = precedence.topk(K, dim=-1)  # (B, K)
    val = (1 - w[:, :, None] - w.gather(1, idx.view(B, N * K)).view(B, N, K)) * val
    # new links w[i] p[j]: K candidate columns per row, none on the diagonal
    new_idx = p_at[:, None, :].expand(B, N, K)
    new_val = w[:, :, None] * p_top[:, None, :]  # (B, N, K)
    new_val = new_val.masked_fill(new_idx == torch.arange(N, device=idx.device)[None, :, None], 0.0)
    # a candidate already stored in its row adds to that link (indices in a row are unique)
    match = idx[:, :, :, None] == new_idx[:, :, None, :]  # (B, N, K old, K new)
    val = val + (match * new_val[:, :, None, :]).sum(-1)
    score = torch.cat([val, new_val.masked_fill(match.any(2), -1.0)], dim=-1)  # -1: never pick a duplicate
    keep = score.topk(K, dim=-1).indices  # (B, N, K)
    return torch.cat([idx, new_idx], -1).gather(-1, keep), torch.cat([val, new_val], -1).gather(-1, keep)


def sparse_link_reads(idx, val, read_w):
    """f = L w and b = L^T w with L stored as K (index, value) pairs per row. read_w (B, R, N)."""
    B, N, K = idx.shape
    R = read_w.size(1)
    flat = idx.view(B, 1, N * K).expand(B, R, N * K)
    fwd = (read_w.gather(2, flat).view(B, R, N, K) * val[:, None]).sum(-1)  # f[i] = sum_k val[i,k] w[idx[i,k]]
    contrib = (val[:, None] * read_w[:, :, :, None]).reshape(B, R, N * K)  # val[i,k] w[i], scattered to idx[i,k]
    bwd = torch.zeros_like(read_w).scatter_add(2, flat, contrib)
    return fwd, bwd


def memory_step(state: dict, iface: dict) -> dict:
    """One DNC memory step: the new memory state, read weights and read vectors (B, R, W)."""
    memory, usage, prec = state["memory"], state["usage"], state["precedence"]  # (B, N, W), (B, N), (B, N)
    read_w_prev, write_w_prev = state["read_weights"], state["write_weights"]  # (B, R, N), (B, N)
    # usage: raised by last step's write, lowered where the read heads free what they read
    psi = torch.prod(1 - iface["free_gates"][:, :, None] * read_w_prev, dim=1)  # (B, N)
    usage = (usage + write_w_prev - usage * write_w_prev) * psi
    alloc = allocation_weights(usage)  # (B, N)
    write_content = content_weights(memory, iface["write_key"][:, None], iface["write_strength"])[:, 0]  # (B, N)
    ag, wg = iface["alloc_gate"], iface["write_gate"]  # (B, 1)
    write_w = wg * (ag * alloc + (1 - ag) * write_content)  # (B, N)
    memory = (memory * (1 - write_w[:, :, None] * iface["erase"][:, None, :])
              + write_w[:, :, None] * iface["write_vector"][:, None, :])
    new = {"memory": memory, "usage": usage, "write_weights": write_w,
           "precedence": (1 - write_w.sum(-1, keepdim=True)) * prec + write_w}
    if "link" in state:
        new["link"] = dense_link_update(state["link"], prec, write_w)
        fwd, bwd = dense_link_reads(new["link"], read_w_prev)
    else:
        new["link_idx"], new["link_val"] = sparse_link_update(state["link_idx"], state["link_val"], prec, write_w)
        fwd, bwd = sparse_link_reads(new["link_idx"], new["link_val"], read_w_prev)
    content = content_weights(memory, iface["read_keys"], iface["read_strengths"])  # (B, R, N)
    modes = iface["read_modes"]  # (B, R, 3)
    read_w = modes[..., 0:1] * bwd + modes[..., 1:2] * content + modes[..., 2:3] * fwd
    new["read_weights"] = read_w
    new["read_vectors"] = read_w @ memory  # r = M^T w: (B, R, W)
    return new


class LSTMController(nn.Module):
    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden_size)

    def initial_state(self, batch_size, device) -> dict:
        zeros = torch.zeros(batch_size, self.cell.hidden_size, device=device)
        return {"h": zeros, "c": zeros.clone()}

    def forward(self, x, state):
        h, c = self.cell(x, (state["h"], state["c"]))
        return h, {"h": h, "c": c}


class _WindowCache:
    """Stands in for model.KVCache in a GPT block: keeps the keys and values of the last `window`
    steps, so a block run one step at a time attends over its own recent past."""

    def __init__(self, k, v, window: int):
        self.k, self.v, self.window = k, v, window

    def update(self, layer, k, v):
        self.k = torch.cat([self.k, k], dim=2)[:, :, -self.window:]
        self.v = torch.cat([self.v, v], dim=2)[:, :, -self.window:]
        return self.k, self.v


class GPTBlockController(nn.Module):
    """A GPT block (model.Block) as the controller: each step's input is projected to the block's
    width and attends over the last `window` steps (no positions: the memory's links keep order)."""

    def __init__(self, input_size: int, hidden_size: int, n_head: int, window: int):
        super().__init__()
        self.window, self.n_head = window, n_head
        self.proj = nn.Linear(input_size, hidden_size)
        self.block = Block(GPTConfig(block_size=window, n_layer=1, n_head=n_head, n_embd=hidden_size), 0)
        self.ln = nn.LayerNorm(hidden_size)

    def initial_state(self, batch_size, device) -> dict:
        hs = self.proj.out_features // self.n_head
        empty = torch.zeros(batch_size, self.n_head, 0, hs, device=device)  # grows to `window` steps
        return {"k": empty, "v": empty.clone()}

    def forward(self, x, state):
        cache = _WindowCache(state["k"], state["v"], self.window)
        h = self.ln(self.block(self.proj(x)[:, None], cache)[:, 0])  # (B, hidden)
        return h, {"k": cache.k, "v": cache.v}


class DNC(nn.Module):
    """Controller + memory. forward(x (B, T, input_size), state=None) -> (y (B, T, output_size), state).
    Pass the returned state back in to carry memory (and the controller's state) across calls."""

    def __init__(self, cfg: DNCConfig):
        super().__init__()
        self.cfg = cfg
        R, W = cfg.read_heads, cfg.word_size
        if cfg.controller == "lstm":
            self.controller = LSTMController(cfg.input_size + R * W, cfg.hidden_size)
        else:
            self.controller = GPTBlockController(cfg.input_size + R * W, cfg.hidden_size, cfg.n_head, cfg.window)
        self.interface = nn.Linear(cfg.hidden_size, cfg.interface_size)
        self.output = nn.Linear(cfg.hidden_size + R * W, cfg.output_size)  # y = W_out [h; r_1..r_R]

    def initial_state(self, batch_size: int, device=None) -> dict:
        device = device or self.interface.weight.device
        c = self.cfg
        N, W, R, K = c.memory_slots, c.word_size, c.read_heads, c.sparse_links
        state = {
            "memory": torch.zeros(batch_size, N, W, device=device),
            "usage": torch.zeros(batch_size, N, device=device),
            "precedence": torch.zeros(batch_size, N, device=device),
            "write_weights": torch.zeros(batch_size, N, device=device),
            "read_weights": torch.zeros(batch_size, R, N, device=device),
            "read_vectors": torch.zeros(batch_size, R, W, device=device),
        }
        if K:
            state["link_idx"] = torch.arange(K, device=device).expand(batch_size, N, K).contiguous()
            state["link_val"] = torch.zeros(batch_size, N, K, device=device)
        else:
            state["link"] = torch.zeros(batch_size, N, N, device=device)
        for k, v in self.controller.initial_state(batch_size, device).items():
            state[f"controller.{k}"] = v
        return state

    def check_state(self, state: dict, batch_size: int):
        """A clear error for a state from another DNC shape, link kind or batch size."""
        want = self.initial_state(batch_size, device="meta")
        if set(state) != set(want):
            raise ValueError(f"DNC state has entries {sorted(state)}, this DNC needs {sorted(want)} "
                             "(saved from a DNC with other settings? sparse_links and controller must match)")
        for k, v in want.items():
            if k.startswith("controller.") and self.cfg.controller == "gpt":
                ok = state[k].shape[:2] == v.shape[:2] and state[k].shape[3:] == v.shape[3:]  # any window fill
            else:
                ok = state[k].shape == v.shape
            if not ok:
                raise ValueError(f"DNC state entry {k!r} has shape {tuple(state[k].shape)}, expected "
                                 f"{tuple(v.shape)} (batch {batch_size}); pass state=None to start afresh")

    def step(self, x, state: dict):
        """One time step: x (B, input_size) -> y (B, output_size), new state."""
        R, W = self.cfg.read_heads, self.cfg.word_size
        ctrl_in = torch.cat([x, state["read_vectors"].flatten(1)], dim=-1)  # reads feed the controller at t+1
        ctrl_state = {k[len("controller."):]: v for k, v in state.items() if k.startswith("controller.")}
        h, ctrl_state = self.controller(ctrl_in, ctrl_state)
        new = memory_step(state, split_interface(self.interface(h), R, W))
        y = self.output(torch.cat([h, new["read_vectors"].flatten(1)], dim=-1))
        new.update({f"controller.{k}": v for k, v in ctrl_state.items()})
        return y, new

    def forward(self, x, state: dict | None = None):
        if x.dim() != 3 or x.size(-1) != self.cfg.input_size:
            raise ValueError(f"DNC input must be (batch, time, {self.cfg.input_size}), got {tuple(x.shape)}")
        if state is None:
            state = self.initial_state(x.size(0), x.device)
        else:
            self.check_state(state, x.size(0))
        ys = []
        for x_t in x.transpose(0, 1).contiguous():  # (B, input_size) blocks of one layout, whatever T is
            y, state = self.step(x_t, state)
            ys.append(y)
        return torch.stack(ys, dim=1), state


def detach_dnc_state(state: dict) -> dict:
    """Cut the graph between calls (truncated backpropagation through time), keeping the values."""
    return {k: v.detach() for k, v in state.items()}


def save_dnc_state(state: dict, path: str):
    """Write a DNC state atomically (tensors only, so it loads with weights_only=True)."""
    atomic_save({k: v.detach().cpu() for k, v in state.items()}, path)


def load_dnc_state(path: str, dnc: DNC, device=None) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no DNC state at {path}: save one with save_dnc_state first")
    try:
        state = torch.load(path, map_location=device or "cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"DNC state {path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "memory" not in state:
        raise ValueError(f"{path} is not a DNC state (no 'memory' entry)")
    dnc.check_state(state, state["memory"].size(0))
    return state


