"""
Trainable memories for a GPT, attached from outside at the attention seam or after a block
(model.py never imports this file): the Memorizing Transformer layer and the metalearned neural
memory (MNM). Their arguments live in MemoryConfig, apart from the model's GPTConfig; a checkpoint
stores both (checkpoint.py).

    model = GPT(GPTConfig(...))
    attach_memories(model, MemoryConfig(knn_layer=4, knn_topk=32, knn_memory_size=16384))
    idx = generate_with_memory(model, idx, 100)    # windows of block_size enter the memories in turn

Memorizing Transformer layer (Wu et al., ICLR 2022)
---------------------------------------------------
MemorizingMemory is a trained kNN-attention layer: each batch row keeps a FIFO of its past windows'
keys and values per head (train.py streams rows document by document and empties a row's memory at
its document's end). It searches with knn.exact_search, the function the persistent store shares.

Metalearned neural memory (Munkhdalai et al. 2019; docs/neural-memory.md)
-------------------------------------------------------------------------
MNM: per head, a small MLP of fast weights written by a learned local rule, a gradient step, or a
Titans-style update (momentum plus a forgetting gate), read through the written weights. The
initial fast weights are learned; the state is one copy per batch row. The seq2seq chatbot
(chat.py) carries it from turn to turn of a conversation; MNMBlock puts one after a GPT block,
written segment by segment.

    mnm = MNM(n_embd=64, heads=4, key_size=16, hidden=32, write="local")
    reads, state, write_loss = mnm(h, mask, mnm.initial_state(B))
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from knn import exact_search
from model import KVCache, append_next, init_weights


MEMORIZING_GATE_INIT = -3.0  # sigmoid(-3) ~ 0.05: the memory starts with a small but nonzero share


@dataclass
class MemoryConfig:
    """The trainable memories of a GPT; -1 = none. Checkpoints keep these as memory_args."""
    # Memorizing Transformer layer: kNN attention over each batch row's past windows at this layer
    knn_layer: int = -1
    knn_topk: int = 32  # memory entries each query attends to
    knn_memory_size: int = 16384  # entries kept per batch row and head, first in first out
    # the dtype retrieval scores in: 'bfloat16' ranks about 2x faster on CPUs with AVX512-BF16 or AMX (and
    # on GPUs), at the price of near-ties ranking differently; the attention over what is retrieved stays
    # in the model's dtype
    knn_search_dtype: str = "float32"
    # training the layer: the gates' starting logit (sigmoid(-3) = 0.047: the memory starts with a small share),
    # and knn_grad_windows = G > 0: while training, the entries of a row's G most recent windows are recomputed
    # from those windows' attention inputs (kept, detached) with the current weights, so the retrieval's loss
    # also trains the layer's key and value projections (the paper's memory is detached: stored keys and values
    # learn only through local attention). Neither changes what a trained model computes.
    knn_gate_init: float = MEMORIZING_GATE_INIT
    knn_grad_windows: int = 0
    # how a head mixes its local attention and its memory: 'gate', y = (1 - g) y_local + g y_mem with one
    # learned g per head (the paper); 'joint', one softmax over the local keys and the retrieved entries
    # together (the gate's logit then shifts the memory's scores), so a token whose answer is in its own
    # window is not diluted by what the memory returns, and one whose answer is in memory is not by the window
    knn_mix: str = "gate"
    # True: each head's memory scores are multiplied by a learned factor (exp of a logit started at 0), so a
    # head can sharpen its choice among the retrieved entries without sharpening its local attention, which
    # shares the query and key projections: the same-template facts of other people crowd the right entry
    # more, the more windows the memory holds (docs/long-range.md)
    knn_learn_scale: bool = False
    # with rotary positions, where a query scores the memory's entries: as keys this many tokens before it.
    # 0: at its own position (no positions: the paper's memory), where in its window it meets only its own
    # key. The in-window lookup a model learnt scores keys tens to hundreds of tokens back; read at distance 0
    # the same keys and queries score differently, so a lookup learnt in the window carries over to the memory
    # only in part (docs/long-range.md). Changes no weight: a resume or an evaluation may change it.
    knn_distance: int = 0
    # metalearned neural memory (MNMBlock) after this layer's block, written window by window with each
    # batch row's document
    mnm_layer: int = -1
    mnm_heads: int = 4
    mnm_key_size: int = 32
    mnm_hidden: int = 64  # width of the fast-weight MLP's hidden layer, per head
    mnm_write: str = "local"  # 'local' (learned local rule), 'grad' (gradient step), 'titans' (momentum + forgetting)
    # G > 0: while training, the latest G windows' writes are recomputed from their inputs (kept, detached) with
    # the current weights, so a window's task loss also trains the write path (keys, values, strengths) of the
    # G windows before it; 0: the write path learns from the write loss alone. Changes no trained model's output.
    mnm_grad_windows: int = 0
    # True: a window makes one write per head, its tokens' keys, values and strengths pooled with learned
    # attention weights (the chatbot's one write per turn), instead of every token writing its own (strengths summing to <= 1)
    mnm_pool: bool = False
    # True: each token's write pairs its own write key with the next token's value and strength, so the memory
    # maps a context to what followed it (what a causal LM reads back: the key digit after "the pass key is");
    # the block carries a window's last key into the next window, so the pair across the boundary is written
    # too (without it, a pass key split by the boundary lost one digit). False: a token's key and value both
    # come from the token itself. Per-token writes only (not with mnm_pool)
    mnm_shift: bool = False
    # what a pair writes as its value: 'hidden', a projection of the block's output at the value's token (learnt);
    # 'token', the value token's input embedding (detached, unit RMS per head; needs mnm_shift): the memory
    # then maps a context to the token that followed it, as kNN-LM's datastore does, and the write loss
    # cannot make values easy to store by making them say nothing (the pass key's learnt values did not
    # name their digit: read back exactly, they gave it 3-16% of the time, docs/RESULTS.md)
    mnm_value: str = "hidden"
    # True: a token's read key is its write key (one projection, as kNN-LM queries and keys are one
    # representation), so the task loss trains the write keys through every read, and the question "...is 4"
    # asks under the key that the statement's "...is 4" wrote; False: separate projections, started equal
    mnm_tie_keys: bool = False
    # per-token writes: the strengths a window spends per head are scaled to sum to at most this many full
    # steps. 1: one step a window (a key's five digits then get about a fifth of a step each); a few: several
    # pairs can each be written whole (with mnm_write_penalty keeping filler unwritten). Changes no weight: a
    # resume may change it
    mnm_write_budget: float = 1.0
    # > 0: an L1 cost on the write strengths, this x the strength a window spends per head before the budget's
    # scaling (the mean over rows and heads of the sum over its tokens), added to the write loss: a window
    # that writes nothing pays nothing, so the memory may learn to keep a key through windows of filler
    # instead of every window spending its full step. Training only; a resume may change it.
    mnm_write_penalty: float = 0.0
    # > 0: a cost on the squared cosine between the write keys of a window's pairs (per-token writes), each
    # pair of pairs weighted by both their strengths (detached: the cost moves keys, not strengths), added
    # to the write loss. Keys that are one vector hold one association: the pass key's five digits were
    # written under keys of cosine 0.97-1.0 and only one of them kept. Training only; a resume may change it.
    mnm_key_spread: float = 0.0


def attach_memories(model, cfg: MemoryConfig):
    """Give a GPT the trainable memories cfg asks for (none when both layers are -1)."""
    if cfg.knn_layer >= 0:
        add_memorizing_layer(model, cfg.knn_layer, cfg.knn_topk, cfg.knn_memory_size, cfg.knn_search_dtype,
                             cfg.knn_gate_init, cfg.knn_grad_windows, cfg.knn_mix, cfg.knn_learn_scale,
                             cfg.knn_distance)
    if cfg.mnm_layer >= 0:
        add_mnm_block(model, cfg.mnm_layer, cfg.mnm_heads, cfg.mnm_key_size, cfg.mnm_hidden, cfg.mnm_write,
                      cfg.mnm_grad_windows, cfg.mnm_pool, cfg.mnm_shift, cfg.mnm_write_penalty,
                      cfg.mnm_write_budget, cfg.mnm_key_spread, cfg.mnm_value, cfg.mnm_tie_keys)
    return model


def row_memories(model) -> dict:
    """The per-row memories of a GPT (unwrapped) by checkpoint key: each keeps one row per batch row."""
    if not hasattr(model, "attentions"):  # not a GPT (the seq2seq chatbot keeps its memory per conversation)
        return {}
    mems = {"knn_memory": memorizing_layer(model), "mnm_memory": mnm_block(model)}
    return {name: m for name, m in mems.items() if m is not None}


# ---- Memorizing Transformer layer (Wu et al., ICLR 2022) ----
# One attention layer (GPTConfig.knn_layer) whose heads also attend to the top-k of their own past
# (key, value) pairs, kept per batch row in a FIFO ring: one (row, head) group of the shared exact
# search (exact_search) per pair, all rows and heads in one batched matrix product.


def memorizing_layer(model):
    """The MemorizingMemory of a GPT (unwrapped, not DDP/compiled), or None when it has none."""
    for attn in model.attentions:
        if isinstance(attn.memory, MemorizingMemory):
            return attn.memory
    return None


def add_memorizing_layer(model, layer: int, topk: int, size: int, search_dtype: str = "float32",
                         gate_init: float = MEMORIZING_GATE_INIT, grad_windows: int = 0, mix: str = "gate",
                         learn_scale: bool = False, distance: int = 0):
    """Give a GPT (e.g. pretrained GPT-2) a memorizing layer at `layer`; recorded in model.memory_args."""
    cfg = model.config
    if not 0 <= layer < cfg.n_layer:
        raise ValueError(f"knn_layer={layer}, but the model has layers 0..{cfg.n_layer - 1}")
    why = MemorizingMemory.distance_conflict(distance, cfg.pos)
    if why:
        raise ValueError(why)
    model.memory_args.update(knn_layer=layer, knn_topk=topk, knn_memory_size=size, knn_search_dtype=search_dtype,
                             knn_gate_init=gate_init, knn_grad_windows=grad_windows, knn_mix=mix,
                             knn_learn_scale=learn_scale, knn_distance=distance)
    memory = MemorizingMemory(cfg.n_head, cfg.n_embd // cfg.n_head, topk, size, search_dtype, gate_init, grad_windows,
                              mix, learn_scale, distance)
    model.attentions[layer].memory = memory.to(next(model.parameters()).device)
    model.attentions[layer].memory.bind(model.attentions[layer])


class MemorizingMemory(nn.Module):
    """The kNN-attention memory of one layer, at the attention seam (model.py).

    Every head attends causally to its local window (the layer's own attention) and to the topk
    (key, value) pairs retrieved from its memory of past windows. With rotary positions (pos='rope')
    the memory keeps keys unrotated and scores them with queries turned to position `distance`: every
    past window's entry as a key that many tokens back (0: the paper's memory, without positions).
    Retrieval ranks by cosine (normalised queries and keys), the retrieved pairs are attended to with
    the ordinary scaled dot product; a learned per-head gate g = sigmoid(gate_bias) mixes:
    y = (1 - g) y_local + g y_mem. With mix='joint' the local keys and the retrieved entries share one
    softmax instead (the memory's scores shifted by gate_bias): per token, g = sigmoid(gate_bias + lse_mem
    - lse_local), where lse is the log-sum-exp of each part's scores. With learn_scale, each head's memory
    scores are first multiplied by exp(score_scale), a learned logit per head started at 0.
    After a forward pass with `write` set, the window's keys and values are appended (detached)
    first-in first-out; so memory entries only ever come from earlier windows.

    The memory is a set of plain tensor attributes, not parameters or registered buffers: it is
    not in the state_dict and DDP never broadcasts it, so each rank keeps its own. It holds
    n_rows rows (train.py: one per batch row of every micro-step); `rows` picks the slice of rows
    the next forward pass reads and writes (None: the first B).
    """
    MIXES = ("gate", "joint")

    def __init__(self, n_head: int, head_size: int, topk: int, size: int, search_dtype: str = "float32",
                 gate_init: float = MEMORIZING_GATE_INIT, grad_windows: int = 0, mix: str = "gate",
                 learn_scale: bool = False, distance: int = 0):
        """gate_init, grad_windows, mix, learn_scale, distance: MemoryConfig's knn_gate_init, knn_grad_windows
        (training only), knn_mix, knn_learn_scale, knn_distance."""
        super().__init__()
        if topk < 1 or size < 1:
            raise ValueError(f"knn_topk={topk} and knn_memory_size={size} must both be >= 1")
        if distance < 0:
            raise ValueError(f"knn_distance={distance}: memory entries sit before their query, give 0 or more tokens")
        if mix not in self.MIXES:
            raise ValueError(f"knn_mix={mix!r}; choose one of {self.MIXES}")
        self.mix = mix
        if search_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"knn_search_dtype={search_dtype!r}; choose 'float32' or 'bfloat16'")
        self.n_head, self.head_size, self.topk, self.size = n_head, head_size, topk, size
        self.search_dtype = getattr(torch, search_dtype)
        self.gate_bias = nn.Parameter(torch.full((n_head,), float(gate_init)))
        self.score_scale = nn.Parameter(torch.zeros(n_head)) if learn_scale else None
        self.grad_windows = grad_windows
        self._x = None  # the attention input of the current forward pass (grad_windows), set by a pre-hook
        self._hooked = None  # id() of the attention module it is bound to (not the module: no submodule cycle)
        self.distance = distance  # rotary positions: entries are scored as keys this many tokens back
        self.write = True  # append each forward pass's window to the memory
        self.read = True  # False: only write (reading a text into memory; layer L's keys do not depend on reads at L)
        self.rows = None  # slice of memory rows used by the next forward pass
        self.n_rows = None
        self.mem = None  # {"keys": (R, H, C, d) unit keys, "norms": (R, H, C), "values": (R, H, C, d), "written": (R,)}
        self.probe = None  # probe(ids, weights): called by retrieve with the retrieved slots and their attention
        # weights, both (B * H, T, topk), for diagnostics (evaluate.py memorizing_diagnostics)

    @staticmethod
    def distance_conflict(distance: int, pos: str) -> str | None:
        """Why a model with these positions cannot read its memory at `distance`, or None: the layer refuses it,
        and the configs that set it (train.py, evaluate.py) ask before any work."""
        if distance and pos != "rope":
            return (f"knn_distance={distance} places memory entries by rotary positions, but the model has "
                    f"pos={pos!r}: train with pos='rope', or read at knn_distance=0")
        return None

    def reset(self, n_rows: int | None = None):
        """Forget everything; the next forward pass allocates n_rows rows (None: its batch size)."""
        self.n_rows, self.mem, self.rows = n_rows, None, None

    def _alloc(self, B: int, like):
        R = self.n_rows or B
        H, C, d = self.n_head, self.size, self.head_size
        self.mem = {"keys": like.new_zeros(R, H, C, d), "norms": like.new_zeros(R, H, C),
                    "values": like.new_zeros(R, H, C, d), "written": torch.zeros(R, dtype=torch.long, device=like.device)}

    def clear_rows(self, rows):
        """Empty the memory of these rows (indices or a bool mask, of the whole memory)."""
        if self.mem is not None:
            self.mem["written"][rows] = 0
            if "recent_start" in self.mem:
                self.mem["recent_start"][rows] = 0

    def counts(self):
        """Entries held per row (R,)."""
        return self.mem["written"].clamp(max=self.size) if self.mem is not None else None

    def get_state(self) -> dict:
        """The memory's tensors, for an exact resume (train.py keeps them in the checkpoint)."""
        return {} if self.mem is None else {k: v.detach().clone() for k, v in self.mem.items()}

    def set_state(self, state: dict):
        self.mem = {k: v.clone() for k, v in state.items()} if state else None
        if self.mem is not None:
            self.n_rows = self.mem["written"].numel()

    def bind(self, attn):
        """Keep the input of the attention this memory sits in (grad_windows recomputes entries from it)."""
        if self._hooked != id(attn):
            attn.register_forward_pre_hook(self._keep_input)
            self._hooked = id(attn)

    def _keep_input(self, module, args):
        self._x = args[0]

    def _grad_active(self, attn) -> bool:
        if self.grad_windows <= 0 or not (self.training and torch.is_grad_enabled()):
            return False
        if self._hooked != id(attn):
            raise RuntimeError("grad_windows needs the memory bound to its attention: memory.bind(attn)")
        return True

    def forward(self, attn, q, k, v, attend):
        B, H, T, d = q.shape
        if attn.n_kv_head != attn.n_head:
            raise RuntimeError("a memorizing layer keeps one key head per query head: grouped-query attention "
                               "(n_kv_head < n_head) is not supported")
        grad = self._grad_active(attn)
        joint = self.mix == "joint"
        y_local, lse_local = self._local(attn, q, k, v) if joint else (attend(q, k, v), None)  # (B, H, T, d)
        k = k[:, :, -T:]  # the new tokens' keys (with a KV cache, k also holds the cached past)
        if attn.rotary is not None:  # keys unrotated, queries at `distance`: see the class docstring
            q, k = attn.rotary.rotate(q, self.distance - attn.q_pos), attn.rotary.rotate(k, -attn.q_pos)
        if self.mem is None:
            self._alloc(B, k.detach())
        ring = self.mem.get("recent_x")
        if grad and (ring is None or ring.size(1) != self.grad_windows * T):
            # a new ring (also after a resume with another grad_windows): entries written before it starts
            # have no kept inputs, and are never recomputed
            R, C = self.mem["written"].numel(), self._x.size(-1)
            self.mem["recent_x"] = self._x.new_zeros(R, self.grad_windows * T, C)
            self.mem["recent_start"] = self.mem["written"].clone()
        rows = self.rows if self.rows is not None else slice(0, B)  # a slice: the memory rows are views
        rid = torch.arange(self.mem["written"].numel(), device=q.device)[rows]  # (B,) memory rows of the batch
        if rid.numel() != B:
            raise RuntimeError(f"the memory has rows {rows} for a batch of {B}: reset() it or set .rows")
        count = self.mem["written"][rows].clamp(max=self.size)  # (B,)
        n_used = int(count.max())
        y = y_local
        if n_used > 0 and self.read:
            recent = self._recent_kv(attn, rows, B, T) if grad else None
            y_mem, lse_mem = self.retrieve(q, rows, count, n_used, recent)
            g = torch.sigmoid(self.gate_bias.view(1, H, 1, 1) + (lse_mem - lse_local if joint else 0)).to(y_local.dtype)
            # exactly y_local where a row's memory is empty; g = 0 gives y_local bit for bit
            y = torch.where((count > 0).view(B, 1, 1, 1), (1 - g) * y_local + g * y_mem, y_local)
        elif self.training:
            # in the graph: DDP expects a gradient for every parameter
            y = y_local + 0 * sum(p.sum() for p in self.parameters(recurse=False))
        if self.write:
            self.append(rid, k, v[:, :, -T:])
            if grad:  # the row's attention inputs of its grad_windows latest windows, oldest first
                recent = self.mem["recent_x"]
                recent[rid] = torch.cat([recent[rid, T:], self._x[:, -T:].detach().to(recent.dtype)], 1)
        return y

    @staticmethod
    def _local(attn, q, k, v):
        """The layer's causal attention computed out (SDPA does not return its normaliser): y (B, H, T, d)
        and the log-sum-exp of each query's scores (B, H, T, 1). With a KV cache, query i sits at Tk - T + i."""
        T, Tk = q.size(2), k.size(2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))  # (B, H, T, Tk)
        causal = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - T)
        scores = scores.float().masked_fill(~causal, float("-inf"))
        lse = scores.logsumexp(-1, keepdim=True)
        p = F.dropout((scores - lse).exp(), attn.attn_dropout if attn.training else 0.0)
        return p.to(v.dtype) @ v, lse

    def _recent_kv(self, attn, rows, B, T):
        """Keys and values (B, H, G*T, d) of the rows' G latest windows, recomputed with gradients."""
        x = self.mem["recent_x"][rows].clone()  # (B, G*T, C); a copy: the ring is written in place after this
        H, d = self.n_head, self.head_size
        _, k, v = attn.c_attn(x).split([H * d, H * d, H * d], dim=2)
        return k.view(B, -1, H, d).transpose(1, 2), v.view(B, -1, H, d).transpose(1, 2)

    def retrieve(self, q, rows, count, n_used, recent=None):
        """Attention of every query over its topk nearest memory entries: (B, H, T, d), and the log-sum-exp
        of its scores (B, H, T, 1). recent: the keys and values of the rows' latest windows with gradients
        (grad_windows), used for those entries."""
        B, H, T, d = q.shape
        G = B * H
        keys = self.mem["keys"][rows, :, :n_used]  # (B, H, n, d), a view
        kk = min(self.topk, n_used)
        with torch.no_grad():  # retrieval picks entries; gradients flow through the attention over them
            qn = F.normalize(q.detach().float(), dim=-1).reshape(G, T, d).to(self.search_dtype)
            n_valid = count.repeat_interleave(H) if bool((count < n_used).any()) else None
            ids = exact_search(qn, keys.reshape(G, n_used, d).to(self.search_dtype), kk, "ip", n_valid=n_valid)  # (G, T, kk)
        g_idx = torch.arange(G, device=q.device)[:, None, None]
        norms = self.mem["norms"][rows, :, :n_used].reshape(G, n_used)[g_idx, ids]  # (G, T, kk)
        k_ret = keys.reshape(G, n_used, d)[g_idx, ids] * norms[..., None]  # raw keys (G, T, kk, d)
        v_ret = self.mem["values"][rows, :, :n_used].reshape(G, n_used, d)[g_idx, ids]  # (G, T, kk, d)
        if recent is not None:  # entries of the latest windows: the recomputed keys and values, with gradients
            k_rec, v_rec = (t.reshape(G, -1, d) for t in recent)
            span = k_rec.size(1)
            written = self.mem["written"][rows].repeat_interleave(H)[:, None, None]  # (G, 1, 1)
            newest = written - 1 - ((written - 1 - ids) % self.size)  # the entry's index in its row's stream
            off = newest - (written - span)  # position among the latest span entries
            mine = off >= 0
            if "recent_start" in self.mem:  # absent from checkpoints written before rings could start late
                mine &= newest >= self.mem["recent_start"][rows].repeat_interleave(H)[:, None, None]
            off = off.clamp(min=0)
            k_ret = torch.where(mine[..., None], k_rec[g_idx, off], k_ret)
            v_ret = torch.where(mine[..., None], v_rec[g_idx, off], v_ret)
        logits = (k_ret @ q.reshape(G, T, d, 1)).squeeze(-1) / math.sqrt(d)  # (G, T, kk)
        if self.score_scale is not None:
            logits = logits * self.score_scale.exp().repeat(B).view(G, 1, 1)  # (G, 1, 1): g = b * H + h
        # entries beyond a row's count are empty slots; a row with none keeps finite zeros (gated out)
        empty = (ids >= count.repeat_interleave(H)[:, None, None]) & (count.repeat_interleave(H) > 0)[:, None, None]
        logits = logits.float().masked_fill(empty, float("-inf"))
        p = F.softmax(logits, dim=-1).to(q.dtype)
        if self.probe is not None:
            self.probe(ids, p.detach())
        lse = logits.logsumexp(-1).view(B, H, T, 1)
        return (p.unsqueeze(-2) @ v_ret).squeeze(-2).view(B, H, T, d), lse

    @torch.no_grad()
    def append(self, rid, k, v):
        """Write the window's keys and values (B, H, T, d) into the rows' rings, oldest out first."""
        T = k.size(2)
        if T > self.size:  # only the newest `size` entries would survive
            self.mem["written"][rid] += T - self.size
            k, v, T = k[:, :, -self.size:], v[:, :, -self.size:], self.size
        k, v = k.detach(), v.detach()
        slots = (self.mem["written"][rid, None] + torch.arange(T, device=k.device)) % self.size  # (B, T)
        norms = k.norm(dim=-1)  # (B, H, T)
        r = rid[:, None]
        self.mem["keys"][r, :, slots] = (k / norms.clamp_min(1e-12)[..., None]).transpose(1, 2).to(self.mem["keys"].dtype)
        self.mem["norms"][r, :, slots] = norms.transpose(1, 2).to(self.mem["norms"].dtype)
        self.mem["values"][r, :, slots] = v.transpose(1, 2).to(self.mem["values"].dtype)
        self.mem["written"][rid] += T


def generate_any(model, idx, max_new_tokens, **kwargs):
    """model.generate, or generate_with_memory when the model keeps per-row memories of earlier windows."""
    if row_memories(model):
        return generate_with_memory(model, idx, max_new_tokens, **kwargs)
    return model.generate(idx, max_new_tokens, **kwargs)


@torch.no_grad()
def generate_with_memory(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None,
                         generators=None, use_cache=True, suppress_tokens=None, suppress_steps=1):
    """GPT.generate for a model with a memorizing layer and/or an MNM block: the sequence (prompt,
    then generated tokens) is cut into windows of block_size, as in training. A token is predicted
    from its own window up to it, locally, and from the memories of all earlier windows; a window
    enters the memories once it is full, by one forward pass over it (the same pass with or without
    the KV cache, so cached decoding equals recomputation). Each batch row has its own memories,
    emptied at the start; the memories' training state is put back afterwards. suppress_tokens /
    suppress_steps as in GPT.generate."""
    mems = [m for m in (memorizing_layer(model), mnm_block(model)) if m is not None]
    if suppress_tokens is not None:
        suppress_tokens = torch.tensor(list(suppress_tokens), dtype=torch.long, device=idx.device)
    T = model.config.block_size
    B = idx.size(0)
    saved = [(m.get_state(), m.n_rows, m.write, m.rows) for m in mems]
    for m in mems:
        m.reset(B)
    cache, committed = None, 0
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    try:
        for step in range(max_new_tokens):
            n = idx.size(1)
            while committed + T <= n - 1:  # windows before the newest token's window enter the memory
                for m in mems:
                    m.write = True
                model(idx[:, committed:committed + T])
                committed, cache = committed + T, None
            for m in mems:
                m.write = False
            if not use_cache:
                logits, _ = model(idx[:, committed:])
            elif cache is None:
                cache = KVCache(model.config, B, idx.device, next(model.parameters()).dtype)
                logits, _ = model(idx[:, committed:], cache=cache)
            else:
                logits, _ = model(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :]
            if suppress_tokens is not None and step < suppress_steps:
                logits = logits.index_fill(1, suppress_tokens, -float("inf"))
            idx, finished = append_next(idx, logits, done, temperature, top_k, top_p, stop_token, generators)
            if finished:
                break
    finally:
        for m, (state, n_rows, write, rows) in zip(mems, saved):
            m.set_state(state)
            m.n_rows, m.write, m.rows = n_rows, write, rows
    return idx



# ---- Metalearned neural memory ----

def where_rows(rows, a, b):
    """a in the batch rows where rows (B,) is True, else b."""
    return torch.where(rows.view(-1, *[1] * (a.dim() - 1)), a, b)


class MNM(nn.Module):
    """Metalearned neural memory (Munkhdalai et al. 2019), with a Titans-style update as a third rule.

    The controller (the model's outputs h, one linear layer here) emits per head and per token a write
    key, a read key, a write value and a write strength beta. The memory is, per head, a small MLP of
    fast weights, f(k) = W2 z1 with z1 = tanh(W1 k) / sqrt(hidden) (keys are unit vectors and |z1| <= 1,
    so a write of strength beta moves f(k) at most by about beta: writes stay stable); the state holds one copy per batch row (one conversation each,
    never shared) and starts from the learned initial weights (w1, w2). A call writes all tokens of a
    segment (a turn) at once, then reads every token's read key through the just-written weights (or,
    with read_first, reads before writing: what a causal language model needs).

    Write rules, each a function of (z0 = k_w, z1, z2 = W2 z1, v_w, beta):
      'local'  (MNM-p) W_l -= sum_t beta_t (z_l - z'_l) z_{l-1}^T with targets z'_2 = v_w and
               z'_1 = tanh(P v_w) / sqrt(hidden), P learned: a local rule, no back-propagation inside the memory;
      'grad'   (MNM-g) W -= lr * grad_W sum_t beta_t |f(k_t) - v_t|^2 / 2, lr learned per head;
      'titans' S = eta S - lr * grad; W = (1 - alpha) W + S, with the momentum eta and the forgetting
               gate alpha predicted per head from the segment's mean output.
    With pool=True a segment makes a single write per head, of its tokens' keys, values and strengths
    averaged with learned attention weights (what a dialogue turn uses: one turn, one fact); otherwise
    every token writes its own pair, the strengths of a segment scaled to sum to at most write_budget (its S
    writes then move the weights at most about as far as that many, and the model chooses which tokens spend it).
    The gradient is written out by hand (two layers), so meta-training back-propagates through the
    writes with one ordinary backward pass. The write loss returned is the beta-weighted |f(k) - v|^2
    after the write, plus key_spread x the strength-weighted mean squared cosine between the segment's
    write keys, plus write_penalty x the strength the segment spent per head before the scaling (an
    L1 cost: writing nothing is free), which the trainer adds to the task loss (write_loss_weight)."""

    WRITES = ("local", "grad", "titans")
    VALUES = ("hidden", "token")
    write_loss_weight = 0.1
    beta_offset = 0.0  # added to the strength logit (kept as the knob for a gentler start)

    def __init__(self, n_embd: int, heads: int, key_size: int, hidden: int, write: str = "local",
                 pool: bool = False, shift: bool = False, write_penalty: float = 0.0, write_budget: float = 1.0,
                 key_spread: float = 0.0, value: str = "hidden", tie_keys: bool = False):
        super().__init__()
        if write not in self.WRITES:
            raise ValueError(f"mnm_write must be one of {self.WRITES}, got {write!r}")
        if value not in self.VALUES:
            raise ValueError(f"mnm_value must be one of {self.VALUES}, got {value!r}")
        why = self.conflict(pool=pool, shift=shift, value=value, key_spread=key_spread)
        if why:
            raise ValueError(why)
        if n_embd % heads:
            raise ValueError(f"n_embd {n_embd} must be a multiple of mnm_heads {heads}")
        if write_penalty < 0:
            raise ValueError(f"mnm_write_penalty={write_penalty}: an L1 cost on write strengths is >= 0")
        if not write_budget > 0:
            raise ValueError(f"mnm_write_budget={write_budget}: the full steps a window may spend must be > 0")
        if key_spread < 0:
            raise ValueError(f"mnm_key_spread={key_spread}: a cost on similar write keys is >= 0")
        self.write_rule, self.pool, self.shift, self.value, self.tie_keys = write, pool, shift, value, tie_keys
        self.write_penalty, self.write_budget, self.key_spread = write_penalty, write_budget, key_spread
        self.H, self.dk, self.dv, self.dh = heads, key_size, n_embd // heads, hidden
        H, dk, dv, dh = self.H, self.dk, self.dv, self.dh
        # per head: write key, read key (unless tied to the write key), value (unless the token's embedding),
        # strength, pooling score
        self.parts = {"kw": dk, **({} if tie_keys else {"kr": dk}), **({"v": dv} if value == "hidden" else {}),
                      "b": 1, "score": 1}
        self.c_mem = nn.Linear(n_embd, H * sum(self.parts.values()))
        self.w1 = nn.Parameter(torch.randn(H, dh, dk))  # initial fast weights; unit keys -> unit-variance preactivations
        self.w2 = nn.Parameter(torch.zeros(H, dv, dh))  # an empty memory reads zeros: reads are what was written
        if write == "local":
            self.target = nn.Parameter(torch.randn(H, dh, dv) / math.sqrt(dv))  # P: layer-1 targets from v_w
        else:
            self.lr = nn.Parameter(torch.zeros(H))  # softplus(0) ~ 0.69
        if write == "titans":
            self.c_gate = nn.Linear(n_embd, 2 * H)  # momentum eta and forgetting alpha, per head
        self.c_proj = nn.Linear(H * dv, n_embd)
        self.probe = None  # probe(beta, kw, kr, v, state): called by forward with each write's strengths (B, H, S or
        # S - 1 or 1, 1), unit write keys (B, H, S or S - 1 or 1, dk) and values (..., dv), the unit read keys
        # (B, H, S, dk) and the state before the write
        self.match_read_keys()

    @staticmethod
    def conflict(pool=False, shift=False, value="hidden", key_spread=0.0) -> str | None:
        """Why these settings cannot go together, or None: MNM refuses them, and the configs that hold them
        (train.py, bench.py) ask before any work."""
        if value == "token" and not shift:
            return ("mnm_value='token' writes the embedding of the token after each key's: set mnm_shift=True "
                    "(a token's own embedding under its own key tells a causal model nothing new)")
        if pool and shift:
            return ("mnm_shift pairs each token's key with the next token's value, mnm_pool makes one pooled write "
                    "per window: use one of the two")
        if pool and key_spread:
            return ("mnm_key_spread spreads the keys of a window's per-token writes, mnm_pool makes one pooled write "
                    "per window: use one of the two")
        return None

    @torch.no_grad()
    def match_read_keys(self):
        """Start the read-key projection equal to the write-key one (call again after re-initialising
        c_mem): a token read in the context it was written in then finds its value from the first step,
        which gives meta-training a signal to start from. They are trained apart from there (unless tied)."""
        if self.tie_keys:
            return
        w = self.c_mem.weight.view(self.H, sum(self.parts.values()), -1)
        b = self.c_mem.bias.view(self.H, sum(self.parts.values()))
        w[:, self.dk:2 * self.dk] = w[:, :self.dk]
        b[:, self.dk:2 * self.dk] = b[:, :self.dk]

    def initial_state(self, batch_size: int) -> dict:
        state = {"w1": self.w1.expand(batch_size, *self.w1.shape), "w2": self.w2.expand(batch_size, *self.w2.shape)}
        if self.write_rule == "titans":
            state["s1"] = torch.zeros_like(state["w1"])
            state["s2"] = torch.zeros_like(state["w2"])
        return state

    def check_state(self, state: dict, batch_size: int):
        want = self.initial_state(batch_size)
        bad = [k for k in set(want) | set(state) if k not in state or k not in want or state[k].shape != want[k].shape]
        if bad:
            raise ValueError(f"memory state entries {sorted(bad)} do not fit this memory ({self.write_rule} write, "
                             f"batch {batch_size}): it was saved by another model or with another batch size")

    def recall(self, state, k):
        """f(k) through the fast weights: k (B, H, S, dk) -> (B, H, S, dv), and tanh(W1 k) (B, H, S, dh)."""
        t = torch.tanh(k @ state["w1"].transpose(-1, -2))
        return (t @ state["w2"].transpose(-1, -2)) / math.sqrt(self.dh), t

    def write(self, state, k, v, beta, h, mask):
        z2, t = self.recall(state, k)
        z1 = t / math.sqrt(self.dh)
        e = (z2 - v) * beta  # (B, H, S, dv)
        if self.write_rule == "local":
            t1 = torch.tanh(v @ self.target.transpose(-1, -2)) / math.sqrt(self.dh)  # (B, H, S, dh)
            return {"w1": state["w1"] - ((z1 - t1) * beta).transpose(-1, -2) @ k,
                    "w2": state["w2"] - e.transpose(-1, -2) @ z1}
        lr = F.softplus(self.lr)[None, :, None, None]  # (1, H, 1, 1)
        g2 = e.transpose(-1, -2) @ z1  # (B, H, dv, dh)
        g1 = ((e @ state["w2"]) * (1 - t * t) / math.sqrt(self.dh)).transpose(-1, -2) @ k  # (B, H, dh, dk)
        if self.write_rule == "grad":
            return {"w1": state["w1"] - lr * g1, "w2": state["w2"] - lr * g2}
        m = mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)  # (B, n_embd)
        eta, alpha = torch.sigmoid(self.c_gate(pooled)).view(-1, 2, self.H, 1, 1).unbind(1)  # (B, H, 1, 1)
        s1, s2 = eta * state["s1"] - lr * g1, eta * state["s2"] - lr * g2
        return {"w1": (1 - alpha) * state["w1"] + s1, "w2": (1 - alpha) * state["w2"] + s2, "s1": s1, "s2": s2}

    @staticmethod
    def key_overlap(kw, w):
        """The mean squared cosine between distinct write keys kw (B, H, S, dk, unit), each pair of keys
        weighted by the product of their strengths w (B, H, S): 1 when every written key is the same vector."""
        ww = w[..., :, None] * w[..., None, :]  # (B, H, S, S)
        ww = ww - torch.diag_embed(w * w)  # a key with itself does not count
        cos2 = (kw @ kw.transpose(-1, -2)).pow(2)  # (B, H, S, S)
        return (cos2 * ww).sum() / ww.sum().clamp(min=1e-12)

    def forward(self, h, mask, state: dict, valid=None, read_first=False, embeddings=None, carry=None):
        """h (B, S, n_embd) a segment's outputs, mask (B, S) its real tokens, valid (B,) the rows that have
        a segment here (others keep their state); embeddings (B, S, n_embd) the segment's token embeddings
        (mnm_value='token' only); with shift, carry (B, n_embd) the previous segment's last output, whose key is
        written with this segment's first value (a row of zeros: nothing to carry; without carry, the pair across
        the boundary goes unwritten). Returns (reads (B, S, n_embd), new state, write loss)."""
        B, S, _ = h.shape
        p = self.c_mem(h).view(B, S, self.H, -1).transpose(1, 2)  # (B, H, S, sum(parts))
        p = dict(zip(self.parts, p.split(list(self.parts.values()), dim=-1)))
        kw, b, score = p["kw"], p["b"], p["score"]
        kr = p.get("kr", kw)  # tied: a token reads under the key it would write
        if self.value == "token":
            if embeddings is None or embeddings.shape != h.shape:
                raise ValueError(f"mnm_value='token' writes token embeddings: pass embeddings of shape {tuple(h.shape)}, "
                                 f"got {None if embeddings is None else tuple(embeddings.shape)}")
            # unit RMS per head (norm sqrt(dv), a LayerNorm output's scale): unit-norm values came back through
            # c_proj at 1/16 of the residual stream's norm, and the model read past them (docs/RESULTS.md)
            e = embeddings.detach().view(B, S, self.H, self.dv).transpose(1, 2)  # (B, H, S, dv)
            v = F.normalize(e, dim=-1) * math.sqrt(self.dv)
        else:
            v = p["v"]
        live = mask if valid is None else mask & valid[:, None]  # (B, S)
        if self.shift:  # pairs (key of token t, value and strength of token t + 1): S - 1 writes
            v0, b0, live0 = v[:, :, :1], b[:, :, :1], live[:, :1]
            kw, v, b, live = kw[:, :, :-1], v[:, :, 1:], b[:, :, 1:], live[:, :-1] & live[:, 1:]
            if carry is not None:  # and, last, the pair across the boundary: the previous segment's last key
                kc = self.c_mem(carry).view(B, self.H, 1, -1)[..., :self.dk]  # (B, H, 1, dk): kw is c_mem's first part
                kw, v, b = torch.cat([kw, kc], 2), torch.cat([v, v0], 2), torch.cat([b, b0], 2)
                live = torch.cat([live, live0 & carry.any(-1, keepdim=True)], 1)
        if self.pool:  # one write per segment: its tokens' keys, values and strengths, attention-pooled
            a = score.masked_fill(~mask[:, None, :, None], float("-inf")).softmax(dim=2)  # (B, H, S, 1)
            kw, v, b = [(a * t).sum(2, keepdim=True) for t in (kw, v, b)]
            live = live.any(1, keepdim=True)  # (B, 1)
        kw, kr = F.normalize(kw, dim=-1), F.normalize(kr, dim=-1)
        beta = raw = torch.sigmoid(b + self.beta_offset) * live[:, None, :, None]  # (B, H, S or 1, 1)
        if not self.pool:  # the tokens share a budget: S full-strength steps at once would overshoot, so
            # strengths summing past write_budget are scaled to sum to it (per head). A window can then spend
            # it on a few tokens (a pass key) and leave the rest unwritten; dividing by S kept each at <= 1/S.
            beta = beta / (beta.sum(2, keepdim=True) / self.write_budget).clamp(min=1)
        if self.probe is not None:
            self.probe(beta.detach(), kw.detach(), kr.detach(), v.detach(), state)
        if read_first:
            reads, _ = self.recall(state, kr)
        new = self.write(state, kw, v, beta, h, mask)
        if valid is not None:  # rows without a segment here keep their memory untouched
            new = {k: where_rows(valid, t, state[k]) for k, t in new.items()}
        if not read_first:
            reads, _ = self.recall(new, kr)
        stored, _ = self.recall(new, kw)
        weight = beta.detach()
        write_loss = ((stored - v).pow(2).mean(-1, keepdim=True) * weight).sum() / weight.sum().clamp(min=1e-6)
        if self.write_penalty:  # the strength a window spends per head, before the scaling
            write_loss = write_loss + self.write_penalty * raw.sum(2).mean()
        if self.key_spread:
            write_loss = write_loss + self.key_spread * self.key_overlap(kw, weight[..., 0])
        return self.c_proj(reads.transpose(1, 2).reshape(B, S, -1)), new, write_loss



def mnm_block(model):
    """The MNMBlock of a GPT (unwrapped), or None when it has none."""
    return next((b for b in model.transformer.h if isinstance(b, MNMBlock)), None)


def add_mnm_block(model, layer: int, heads: int, key_size: int, hidden: int, write: str, grad_windows: int = 0,
                  pool: bool = False, shift: bool = False, write_penalty: float = 0.0, write_budget: float = 1.0,
                  key_spread: float = 0.0, value: str = "hidden", tie_keys: bool = False):
    """Give a GPT (e.g. pretrained GPT-2) an MNMBlock at `layer`; recorded in model.memory_args. With
    value='token' the block receives the token embeddings of each call from a hook on the model's wte."""
    cfg = model.config
    if not 0 <= layer < cfg.n_layer:
        raise ValueError(f"mnm_layer={layer}, but the model has layers 0..{cfg.n_layer - 1}")
    if grad_windows < 0:
        raise ValueError(f"mnm_grad_windows={grad_windows}: 0 (the write path learns from its write loss) or more")
    model.memory_args.update(mnm_layer=layer, mnm_heads=heads, mnm_key_size=key_size, mnm_hidden=hidden,
                             mnm_write=write, mnm_grad_windows=grad_windows, mnm_pool=pool, mnm_shift=shift,
                             mnm_write_penalty=write_penalty, mnm_write_budget=write_budget,
                             mnm_key_spread=key_spread, mnm_value=value, mnm_tie_keys=tie_keys)
    mnm = MNM(cfg.n_embd, heads, key_size, hidden, write, pool, shift, write_penalty, write_budget, key_spread, value,
              tie_keys)
    mnm.apply(init_weights)
    nn.init.normal_(mnm.c_proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))  # a residual projection
    mnm.match_read_keys()
    block = MNMBlock(model.transformer.h[layer], mnm, grad_windows).to(next(model.parameters()).device)
    model.transformer.h[layer] = block
    if value == "token":
        model.transformer.wte.register_forward_hook(block.see_embeddings)


class MNMBlock(nn.Module):
    """A GPT block followed by an MNM that a long document is written into segment by segment:

        model.transformer.h[L] = MNMBlock(model.transformer.h[L], MNM(n_embd, 4, 32, 64))
        block.reset(); then model(segment_1), model(segment_2), ...   # in order, one document per row

    Each forward call is one segment: its tokens first read what the earlier segments wrote (so no
    token sees its own segment's future), then the segment is written (every token its own pair; with
    shift, the previous segment's last key with this one's first value as well).

    The state carried from one call to the next is detached: back-propagation is truncated at the
    segment boundary, so a document's graph never grows past one segment. Within a segment the task
    loss reaches the read path (the read-key part of c_mem, c_proj) and, in rows whose document starts
    here, the initial fast weights w1, w2 they read; the write path (write keys, values, strengths,
    the rule's own parameters) learns from write_loss, which the trainer adds to the task loss. With
    grad_windows = G, while training, the row's latest G writes (of its current document) are done again
    from the state before the oldest of them and their inputs (all kept, detached) with the current
    weights: the same state, now with a graph, so the task loss also trains the write path G segments back.

    Rows follow MemorizingMemory's protocol (train.py keeps one row per batch row of every micro-step):
    reset(n_rows), `rows` (the slice of rows the next call reads and writes), clear_rows(rows) (those
    rows' documents ended: they go back to the learned initial weights), get_state / set_state."""

    def __init__(self, block: nn.Module, mnm: MNM, grad_windows: int = 0):
        super().__init__()
        self.block, self.mnm, self.grad_windows = block, mnm, grad_windows
        self.write_loss = None
        self.embeddings = None  # mnm_value='token': the token embeddings of the model's current call (see_embeddings)
        self.write = True  # False: read only (generation reads a window's tokens one by one, then writes it whole)
        self.reset()

    @property
    def attn(self):  # GPT.attentions finds the wrapped block's attention (and any memory attached there)
        return self.block.attn

    def reset(self, n_rows: int | None = None):
        """Forget every row; the next call allocates n_rows rows (None: its batch size)."""
        self.n_rows, self.rows, self.state = n_rows, None, None
        self.fresh = None  # (R,) bool: the row holds the initial weights (read live, so they get the gradient)
        self.previous = None  # grad_windows: each row's latest writes, their inputs and the states before them
        self.last = None  # shift: each row's last written output, whose key pairs with the next window's first value
        # (a row of zeros: none yet, e.g. resumed from a checkpoint that did not keep it; zeros carry nothing)

    def clear_rows(self, rows):
        """Send these rows (indices or a bool mask, of all rows) back to the learned initial weights."""
        if self.state is not None:
            self.fresh[rows] = True
            self.state = {k: v.detach() for k, v in self._start_fresh(self.state, self.fresh).items()}

    def _start_fresh(self, state: dict, fresh):
        init = self.mnm.initial_state(fresh.numel())
        return {k: where_rows(fresh, init[k].to(v.dtype), v) for k, v in state.items()}

    def see_embeddings(self, module, inputs, output):
        """A forward hook on the model's token embedding (wte): what the next call's pairs write as values."""
        self.embeddings = output

    def get_state(self) -> dict:
        """The rows' fast weights and fresh flags (and with grad_windows the previous writes' state and inputs),
        for an exact resume (train.py keeps them in the checkpoint)."""
        if self.state is None:
            return {}
        out = {**{k: v.detach().clone() for k, v in self.state.items()}, "fresh": self.fresh.clone()}
        if self.last is not None:
            out["last"] = self.last.clone()
        if self.previous is not None:
            out.update({f"previous_{k}": self.previous[k].clone() for k in ("e", "carry") if k in self.previous})
            out.update({"previous_x": self.previous["x"].clone(), "previous_written": self.previous["written"].clone(),
                        **{f"previous_{k}": v.clone() for k, v in self.previous["state"].items()}})
        return out

    def set_state(self, state: dict):
        state = dict(state)
        prev = {k[len("previous_"):]: state.pop(k) for k in list(state) if k.startswith("previous_")}
        if prev and prev["written"].dim() == 1:  # kept by a block of one window, before the ring
            prev = {k: v[None] for k, v in prev.items()}
        self.previous = {"x": prev.pop("x").clone(), "written": prev.pop("written").clone(),
                         **{k: prev.pop(k).clone() for k in ("e", "carry") if k in prev},
                         "state": {k: v.clone() for k, v in prev.items()}} if prev else None
        G = self.grad_windows
        if self.previous is not None and G and self.previous["x"].size(0) != G:  # resumed with another grad_windows:
            self.previous = {k: (resize_ring(v, G) if k != "state" else {n: resize_ring(t, G) for n, t in v.items()})
                             for k, v in self.previous.items()}  # keep the newest writes that fit
        self.last = state.pop("last").clone() if "last" in state else None
        self.fresh = state.pop("fresh").clone() if state else None
        self.state = {k: v.clone() for k, v in state.items()} if state else None
        if self.state is not None:
            self.mnm.check_state(self.state, self.fresh.numel())
            self.n_rows = self.fresh.numel()

    def forward(self, x, cache=None, mask=None):
        x = self.block(x, cache, mask)
        B = x.size(0)
        if self.state is None:
            R = self.n_rows or B
            self.state = {k: v.detach().clone() for k, v in self.mnm.initial_state(R).items()}
            self.fresh = torch.ones(R, dtype=torch.bool, device=x.device)
        lo, hi, _ = (self.rows or slice(0, B)).indices(self.fresh.numel())
        if hi - lo != B:
            raise RuntimeError(f"the memory has rows {lo}..{hi - 1} for a batch of {B}: reset() it or set .rows")
        state = self._start_fresh({k: v[lo:hi] for k, v in self.state.items()}, self.fresh[lo:hi].clone())
        live = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        e = self.embeddings  # None unless value='token' installed the hook that sets it
        carry = None
        if self.mnm.shift:  # a row whose document goes on carries its last output over (fresh rows: zeros, nothing)
            if self.last is None:
                self.last = x.new_zeros(self.fresh.numel(), x.size(-1))
            # a new tensor: this window's write overwrites self.last before the backward pass
            carry = self.last[lo:hi] * ~self.fresh[lo:hi, None]
        before = state
        if self.grad_windows and self.training and torch.is_grad_enabled():
            state = self._rewrite_previous(state, lo, hi, x.size(1))
        reads, new, self.write_loss = self.mnm(x, live, state, read_first=True, embeddings=e, carry=carry)
        if self.write:
            if self.grad_windows and self.training:
                self._keep_previous(before, x, e, carry, lo, hi)
            self.state = {k: torch.cat([v[:lo], new[k].detach(), v[hi:]]) for k, v in self.state.items()}
            if carry is not None:
                self.last[lo:hi] = x[:, -1].detach()
            self.fresh[lo:hi] = False
        return x + reads

    def _keep_previous(self, state, x, e, carry, lo, hi):
        """Keep the rows' state before this write and the write's inputs (grad_windows), detached: a ring of
        the rows' grad_windows latest writes, oldest first."""
        R, G = self.fresh.numel(), self.grad_windows
        prev = self.previous
        if prev is None or prev["x"].shape[2:] != x.shape[1:]:
            prev = self.previous = {"x": x.new_zeros(G, R, *x.shape[1:]),
                                    "state": {k: v.detach().new_zeros(G, *v.shape) for k, v in self.state.items()},
                                    "written": torch.zeros(G, R, dtype=torch.bool, device=x.device)}
        if e is not None and "e" not in prev:
            prev["e"] = e.new_zeros(G, R, *e.shape[1:])
        if carry is not None and "carry" not in prev:  # also: resumed from a state kept before the carry
            prev["carry"] = carry.new_zeros(G, R, *carry.shape[1:])
        new = {"x": x, "e": e, "carry": carry, "written": torch.ones(hi - lo, dtype=torch.bool, device=x.device)}
        for k, v in new.items():
            if v is not None:
                prev[k][:, lo:hi] = torch.cat([prev[k][1:, lo:hi], v.detach()[None]])
        for k, v in state.items():
            prev["state"][k][:, lo:hi] = torch.cat([prev["state"][k][1:, lo:hi], v.detach()[None]])
        # a row whose document starts with this write keeps none of the previous document's
        prev["written"][:-1, lo:hi] &= ~self.fresh[lo:hi]

    def _rewrite_previous(self, state, lo, hi, S):
        """The rows' state after their latest writes (up to grad_windows of this document), recomputed with a
        graph from the state before the oldest of them (rows with none keep theirs)."""
        prev = self.previous
        if prev is None or prev["x"].size(2) != S:
            return state
        written = prev["written"][:, lo:hi] & ~self.fresh[lo:hi]  # (G, B): kept writes of the row's current document
        if not bool(written.any()):
            return state
        live = torch.ones(hi - lo, S, dtype=torch.bool, device=state["w1"].device)
        started = torch.zeros_like(written[0])
        for j in range(written.size(0)):  # oldest first
            if not bool(written[j].any()):
                continue
            begin = written[j] & ~started  # the row's oldest kept write: start from the state kept before it
            # copies: the kept tensors are overwritten in place by this window's write, before the backward pass
            state = {k: where_rows(begin, prev["state"][k][j, lo:hi].clone(), v) for k, v in state.items()}
            e = prev["e"][j, lo:hi].clone() if "e" in prev else None
            carry = prev["carry"][j, lo:hi].clone() if "carry" in prev else None
            _, again, _ = self.mnm(prev["x"][j, lo:hi].clone(), live, state, embeddings=e, carry=carry)
            state = {k: where_rows(written[j], again[k], v) for k, v in state.items()}
            started |= written[j]
        return state


def resize_ring(t, G: int):
    """A ring of kept writes (G_old, R, ...) with G slots: the newest that fit, older ones empty."""
    if t.size(0) >= G:
        return t[t.size(0) - G:].clone()
    return torch.cat([t.new_zeros(G - t.size(0), *t.shape[1:]), t])
