"""
The seq2seq chatbot: an encoder-decoder built from model.py's blocks, a metalearned memory
(memory.MNM) that carries what the user said from turn to turn, and an elastic vocabulary
that grows with every new word. Everything the chatbot needs lives here: the model, its
training batches (DialogBatches, used by train.py task='dialog'), vocabulary growth and
pruning, conversation state (saved as safetensors + JSON), the chat loop and the dialogue
evaluation (sample.py mode='chat' and eval='dialog').
"""

import copy
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from common import atomic_write, check_fields, first_line, pyplot, read_jsonl
from configurator import ConfigError
from knn import model_fingerprint
from memory import MNM
from model import (Block, GPTConfig, KVCache, append_next, configure_optimizers, init_weights, peak_flops,
                   scale_residual_init)
from prepare import DataError, WordVocab

CONVERSATION_FORMAT = 2  # 2: the state carries the fingerprint of the model it belongs to (1 loads, unchecked)

# -----------------------------------------------------------------------------
# the model

# seq2seq: an encoder-decoder built from the GPT's blocks, for turn-by-turn dialogue with a memory

@dataclass
class Seq2SeqConfig(GPTConfig):
    """n_layer counts decoder blocks; block_size is the longest utterance or reply, in tokens."""
    model_type: str = "seq2seq"
    n_enc_layer: int = 2
    memory: str = "none"  # 'none' or 'mnm' (memory.MNM, between the turns of a conversation; mnm_* shape it)
    mnm_heads: int = 4
    mnm_key_size: int = 32
    mnm_hidden: int = 64  # width of the fast-weight MLP's hidden layer, per head
    mnm_write: str = "local"  # 'local' (learned local rule), 'grad' (gradient step), 'titans' (momentum + forgetting)
    mnm_read: str = "before"  # a turn reads the memory 'before' or 'after' its own write
    mnm_tbptt: int = 0  # > 0: training cuts the gradient through the memory every this many turns


class CrossAttention(nn.Module):
    """Decoder queries over the encoder's outputs (and the memory's reads), padding masked."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head

    def heads(self, x):
        B, T, C = x.size()
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

    def kv(self, enc):
        """Keys and values of the encoder side, (B, nh, S, hs) each: computed once per turn."""
        return tuple(map(self.heads, self.c_kv(enc).split(enc.size(-1), dim=2)))

    def forward(self, x, kv, mask):
        B, T, C = x.size()
        dropout_p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(self.heads(self.c_q(x)), *kv, attn_mask=mask, dropout_p=dropout_p)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class DecoderBlock(Block):
    """A GPT block (causal self-attention, MLP) with cross-attention between the two."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.ln_3 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.cross_attn = CrossAttention(config)

    def forward(self, x, cross_kv, cross_mask, cache: KVCache | None = None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.cross_attn(self.ln_3(x), cross_kv, cross_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class Seq2Seq(nn.Module):
    """Encoder-decoder over conversation turns: the encoder (bidirectional GPT blocks) reads only the
    user's current utterance; the decoder (causal GPT blocks + cross-attention) writes the reply. With
    memory='mnm' the encoder's outputs are written into a metalearned memory whose fast weights persist
    from turn to turn, and read back through the just-written weights; the decoder attends to the
    encoder outputs and to those reads. Nothing else carries over between turns, so what the bot knows
    of earlier turns went through the memory.

    Token embeddings are tied to the output layer. `slots` (B, K, n_embd), optional, are extra embedding
    rows per batch row, addressed as ids vocab_size .. vocab_size + K - 1 in inputs and scored as extra
    logits: the trainer fills them with fresh random rows for the fact words of each dialogue.
    Built from model.py's blocks and shares its initialisation and optimizer set-up."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),  # encoder and decoder positions alike
            drop=nn.Dropout(config.dropout),
            enc=nn.ModuleList([Block(config, i) for i in range(config.n_enc_layer)]),
            ln_enc=nn.LayerNorm(config.n_embd, bias=config.bias),
            h=nn.ModuleList([DecoderBlock(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        for block in self.transformer.enc:
            block.attn.causal = False
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.memory = None
        if config.memory == "mnm":
            self.memory = MNM(config.n_embd, config.mnm_heads, config.mnm_key_size, config.mnm_hidden,
                              config.mnm_write, pool=True)
            # reads are normalised like the encoder's outputs they sit beside: the decoder sees them at
            # full scale from the first step, however small the memory's output starts
            self.transformer.ln_mem = nn.LayerNorm(config.n_embd, bias=config.bias)
        elif config.memory != "none":
            raise ValueError(f"memory must be 'none' or 'mnm', got {config.memory!r}")
        if config.mnm_read not in ("before", "after"):
            raise ValueError(f"mnm_read must be 'before' or 'after', got {config.mnm_read!r}")
        self.apply(init_weights)
        scale_residual_init(self, config.n_layer + config.n_enc_layer)
        if self.memory is not None:
            self.memory.match_read_keys()

    def embed(self, idx, slots=None, start=0):
        """(B, T) ids at positions start.. -> (B, T, n_embd) token + position embeddings; ids >=
        vocab_size index slots."""
        V = self.transformer.wte.weight.size(0)
        tok = self.transformer.wte(idx.clamp(max=V - 1))
        if slots is not None:
            slot = torch.gather(slots, 1, (idx - V).clamp(min=0)[..., None].expand(*idx.shape, slots.size(-1)))
            tok = torch.where((idx >= V)[..., None], slot, tok)
        pos = torch.arange(start, start + idx.size(1), device=idx.device)
        return self.transformer.drop(tok + self.transformer.wpe(pos))

    def logits(self, x, slots=None):
        """Tied output layer: (B, T, vocab_size [+ K])."""
        logits = self.lm_head(x)
        if slots is not None:
            logits = torch.cat([logits, x @ slots.transpose(1, 2)], dim=-1)
        return logits

    def encode(self, src, slots=None):
        """src (B, S) user utterances, padded -> outputs (B, S, n_embd), mask (B, S) of real tokens."""
        if src.size(1) > self.config.block_size:
            raise ValueError(f"an utterance of {src.size(1)} tokens is longer than block_size {self.config.block_size}")
        mask = src != PAD_ID
        mask[:, 0] = True  # an empty (padding) turn still attends somewhere
        x = self.embed(src, slots)
        for block in self.transformer.enc:
            x = block(x, mask=mask[:, None, None, :])
        return self.transformer.ln_enc(x), mask

    def initial_state(self, batch_size):
        """The memory state at the start of a conversation (the learned initial fast weights, one copy
        per batch row); {} without a memory."""
        return self.memory.initial_state(batch_size) if self.memory is not None else {}

    def remember(self, enc, mask, state, valid=None, persist=True):
        """Write this turn's encoder outputs into the memory, then read it. Returns what the decoder
        attends to, (B, S [+ S], n_embd), its mask, the new state and the write loss. persist=False is
        the no-memory baseline: every turn starts again from the initial fast weights."""
        if self.memory is None:
            return enc, mask, state, enc.new_zeros(())
        if not persist:
            state = self.initial_state(enc.size(0))
        reads, state, write_loss = self.memory(enc, mask, state, valid, read_first=self.config.mnm_read == "before")
        return torch.cat([enc, self.transformer.ln_mem(reads)], dim=1), torch.cat([mask, mask], dim=1), state, write_loss

    def decode(self, tgt, cross, cross_mask, slots=None, cache: KVCache | None = None, cross_kv=None):
        """tgt (B, T) reply tokens so far (starting with <bos>) -> logits (B, T, V [+ K])."""
        start = cache.pos if cache is not None else 0
        if start + tgt.size(1) > self.config.block_size:
            raise ValueError(f"a reply of {start + tgt.size(1)} tokens is longer than block_size {self.config.block_size}")
        cross_kv = cross_kv or [block.cross_attn.kv(cross) for block in self.transformer.h]
        x = self.embed(tgt, slots, start)
        m = cross_mask[:, None, None, :]
        for block, kv in zip(self.transformer.h, cross_kv):
            x = block(x, kv, m, cache)
        if cache is not None:
            cache.pos += tgt.size(1)
        return self.logits(self.transformer.ln_f(x), slots)

    def forward(self, src, tgt, targets=None, slots=None):
        """A batch of whole dialogues: src (B, N, S) user turns, tgt (B, N, T) replies starting with <bos>,
        targets (B, N, T) the replies shifted (-1 = ignored). Turns run in order through the memory.
        Returns (logits (B, N, T, V [+ K]), loss): mean reply cross entropy + the memory's write loss."""
        B, N, S = src.shape
        rows = lambda t: t.repeat_interleave(N, dim=0) if t is not None else None  # per dialogue -> per turn
        enc, mask = self.encode(src.reshape(B * N, S), rows(slots))  # turns do not see each other
        enc, mask = enc.view(B, N, S, -1), mask.view(B, N, S)
        valid = (src != PAD_ID).any(-1)  # (B, N): turns that exist
        state, cross, cross_mask, write_losses = self.initial_state(B), [], [], []
        tbptt = self.config.mnm_tbptt
        for n in range(N):
            if tbptt and n and n % tbptt == 0:
                state = {k: v.detach() for k, v in state.items()}
            c, cm, state, wl = self.remember(enc[:, n], mask[:, n], state, valid[:, n])
            cross.append(c)
            cross_mask.append(cm)
            write_losses.append(wl)
        cross = torch.stack(cross, 1).flatten(0, 1)  # (B * N, S', n_embd)
        cross_mask = torch.stack(cross_mask, 1).flatten(0, 1)
        logits = self.decode(tgt.reshape(B * N, -1), cross, cross_mask, rows(slots))
        logits = logits.view(B, N, tgt.size(-1), -1)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 2), targets.reshape(-1), ignore_index=-1)
        if self.memory is not None:
            loss = loss + self.memory.write_loss_weight * torch.stack(write_losses).mean()
        return logits, loss

    @torch.no_grad()
    def reply(self, cross, cross_mask, max_new_tokens, temperature=0.0, top_k=None, generators=None,
              use_cache=True):
        """Reply tokens (B, <= max_new_tokens) to one turn, after <bos>, ending with <eos> (rows that
        finished early are padded with <eos>). With the KV cache it equals recomputing every step."""
        B = cross.size(0)
        cross_kv = [block.cross_attn.kv(cross) for block in self.transformer.h]
        idx = torch.full((B, 1), BOS_ID, dtype=torch.long, device=cross.device)
        done = torch.zeros(B, dtype=torch.bool, device=cross.device)
        cache = KVCache(self.config, B, cross.device, cross.dtype) if use_cache else None
        for _ in range(min(max_new_tokens, self.config.block_size)):
            new = idx[:, -1:] if cache is not None and cache.pos else idx
            logits = self.decode(new, cross, cross_mask, cache=cache, cross_kv=cross_kv)
            idx, finished = append_next(idx, logits[:, -1], done, temperature, top_k, None, EOS_ID, generators)
            if finished:
                break
        return idx[:, 1:]

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return configure_optimizers(self, weight_decay, learning_rate, betas, device_type)

    def estimate_mfu(self, tokens_per_sec: float, device_name: str | None, dtype: str) -> float | None:
        """Model FLOPs utilisation (6N per token: a turn's attention spans are short)."""
        peak = peak_flops(device_name, dtype)
        return None if peak is None else 6 * self.get_num_params() * tokens_per_sec / peak


# the WordVocab's special ids (prepare.SPECIALS): padding, start and end of a reply
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def new_embedding_rows(weight, n, generator=None):
    """The init rule for the rows of new words: N(0, s^2), s the RMS of the existing embedding, so a new
    word starts at the scale of the words the model knows. The trainer draws a dialogue's slot rows
    by the same rule, which is what lets the model copy a word it meets for the first time."""
    s = weight.detach().float().pow(2).mean().sqrt()
    rows = torch.randn(n, weight.size(1), generator=generator, device=generator.device if generator else "cpu")
    return (rows.to(weight.device) * s).to(weight.dtype)


@torch.no_grad()
def remap_vocab(model, keep, n_new=0, optimizer=None, generator=None):
    """Rebuild the tied token embedding (transformer.wte = lm_head) as the old rows `keep`, in that
    order, followed by n_new rows from new_embedding_rows. keep = range(V) grows the vocabulary (every
    old row and so every old logit stays exactly as it was); a subset prunes it. The optimizer's
    per-row state (AdamW's exp_avg and exp_avg_sq) is remapped the same way, zeros for new rows, and
    the new Parameter takes the old one's place in its param group and state."""
    old = model.transformer.wte.weight
    keep = torch.as_tensor(keep, dtype=torch.long, device=old.device)
    new = nn.Parameter(torch.cat([old[keep], new_embedding_rows(old, n_new, generator)]))
    model.transformer.wte.weight = new
    model.lm_head.weight = new
    model.config.vocab_size = new.size(0)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = optimizer.state.pop(old, None)
        if state is not None:
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == old.shape:
                    state[k] = torch.cat([v[keep], v.new_zeros(n_new, v.size(1))])
            optimizer.state[new] = state
    return new


# -----------------------------------------------------------------------------
# training batches (train.py task='dialog') and the elastic vocabulary they grow

class DialogBatches:
    """Whole dialogues from data_path/dialogs_{train,val}.jsonl, drawn as a pure function of
    (seed, stream, index), turned into Seq2Seq inputs by the elastic vocabulary. The fact words of
    each dialogue (its "entities") are swapped for slot ids with fresh random embedding rows, drawn by
    the rule new words get (new_embedding_rows): the model cannot learn those words by heart and
    learns instead to copy what the memory hands back, which is what a word typed at chat time needs.
    Utterances longer than block_size keep their last block_size tokens, replies their first."""

    def __init__(self, data_path, seed, n_slots, block_size):
        self.splits = {split: read_dialogs(os.path.join(data_path, f"dialogs_{split}.jsonl"),
                                           fix="task='dialog' reads dialogues; run: python prepare.py dialogs")
                       for split in ("train", "val")}
        self.seed, self.n_slots, self.block_size = seed, n_slots, block_size

    def draw(self, split, stream, index, n_rows):
        rng = np.random.default_rng([self.seed, stream, index])
        dialogs = self.splits[split]
        return [dialogs[i] for i in rng.integers(0, len(dialogs), size=n_rows)]

    @staticmethod
    def words(dialogs):
        """Every word of the dialogues except their fact words, in order."""
        out = []
        for d in dialogs:
            entities = {w for e in d["entities"] for w in WordVocab.tokenize(e)}
            for turn in d["turns"]:
                out += [w for w in WordVocab.tokenize(turn["user"] + " " + turn["bot"]) if w not in entities]
        return out

    def tensors(self, dialogs, vocab, embedding, generator, device):
        """(src (B, N, S), tgt (B, N, T), targets (B, N, T), slots (B, K, n_embd)) for Seq2Seq.forward."""
        B, N, V, K = len(dialogs), max(len(d["turns"]) for d in dialogs), len(vocab), self.n_slots
        encoded = []
        for d in dialogs:
            entities = sorted({w for e in d["entities"] for w in WordVocab.tokenize(e)})
            if len(entities) > K:
                raise DataError(f"a dialogue has {len(entities)} fact words, more than dialog_slots={K}; raise it")
            slot_of = {w: V + int(j) for w, j in zip(entities, torch.randperm(K, generator=generator))}
            ids = lambda text: [slot_of.get(w, vocab.stoi.get(w, vocab.unk)) for w in WordVocab.tokenize(text)]
            encoded.append([(ids(t["user"])[-self.block_size:], ids(t["bot"])[:self.block_size - 1])
                            for t in d["turns"]])
        S = max(len(u) for turns in encoded for u, _ in turns)
        T = max(len(r) for turns in encoded for _, r in turns) + 1
        src = torch.full((B, N, S), vocab.pad, dtype=torch.long)
        tgt = torch.full((B, N, T), vocab.pad, dtype=torch.long)
        targets = torch.full((B, N, T), -1, dtype=torch.long)
        for b, turns in enumerate(encoded):
            for n, (u, r) in enumerate(turns):
                src[b, n, :len(u)] = torch.tensor(u, dtype=torch.long)
                tgt[b, n, :len(r) + 1] = torch.tensor([vocab.bos] + r, dtype=torch.long)
                targets[b, n, :len(r) + 1] = torch.tensor(r + [vocab.eos], dtype=torch.long)
        slots = new_embedding_rows(embedding, B * K, generator).view(B, K, -1)
        return src.to(device), tgt.to(device), targets.to(device), slots.to(device)


def grow_vocab(vocab, model, words, step, optimizer=None, generator=None) -> list[str]:
    """Add the unknown words to the vocabulary and the model (new embedding rows, optimizer state
    resized in step) and count every word as seen at `step`. Returns the new words."""
    new = vocab.add(words, step)
    if new:
        remap_vocab(model, range(len(vocab) - len(new)), len(new), optimizer, generator)
    vocab.observe([vocab.stoi[w] for w in words], step)
    return new


def prune_vocab(vocab, model, min_count=0, capacity=None, optimizer=None, keep=()) -> list[str]:
    """Prune the vocabulary (prepare.WordVocab.prune) and remap the model's embedding rows and the
    optimizer's state the same way. Returns the words dropped."""
    before = list(vocab.words)
    alive = vocab.prune(min_count, capacity, keep)
    if len(alive) < len(before):
        remap_vocab(model, alive, 0, optimizer)
    return sorted(set(before) - set(vocab.words))




# -----------------------------------------------------------------------------
# conversations: state, chat loop, evaluation

def save_conversation(path: str, state: dict, embedding, vocab: dict, extra: dict | None = None):
    """A conversation's state as two files: PATH.safetensors (the memory's fast weights and the token
    embedding, which holds the rows of words added while chatting) and PATH.json (the vocabulary with
    its counts, and `extra`). Both are written atomically; no pickle."""
    from safetensors.torch import save
    tensors = {f"memory.{k}": v.detach().contiguous().cpu() for k, v in state.items()}
    tensors["wte"] = embedding.detach().contiguous().cpu()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(f"{path}.safetensors", lambda f: f.write(save(tensors)))
    atomic_write(f"{path}.json", lambda f: json.dump({"format_version": CONVERSATION_FORMAT, "vocab": vocab,
                                                      **(extra or {})}, f), "w")


# what Conversation.save writes beside the vocabulary, and its types
CONVERSATION_FIELDS = {"step": int, "batch_size": int, "trained_words": list}


def load_conversation(path: str, device="cpu"):
    """(memory state, embedding, WordVocab, the JSON's other entries) as save_conversation wrote them.
    Missing or damaged files (not safetensors / JSON, missing entries, wrong types) are a DataError."""
    from safetensors.torch import load_file
    damaged = f"conversation state {path} is damaged"
    fix = "restore both files from a copy, or start a new conversation"
    for name in (f"{path}.safetensors", f"{path}.json"):
        if not os.path.isfile(name):
            raise DataError(f"no conversation state {name}: save one first (/save {path} in the chat, or chat_save)")
    try:
        tensors = load_file(f"{path}.safetensors", device=str(device))
        with open(f"{path}.json", encoding="utf-8") as f:
            meta = json.load(f)
    except Exception as e:  # safetensors, JSON and UTF-8 errors alike: the file is not what we wrote
        raise DataError(f"{damaged} ({type(e).__name__}: {str(e)[:200]}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in (1, CONVERSATION_FORMAT):
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise DataError(f"{path}.json is not a conversation state this code reads (format_version {version!r}, "
                        f"expected 1 or {CONVERSATION_FORMAT})")
    fields = {"vocab": dict, **CONVERSATION_FIELDS}
    if meta["format_version"] >= 2:
        fields["model_fingerprint"] = str
    problem = check_fields(meta, fields)
    if problem is None and (meta["batch_size"] < 1 or meta["step"] < 0):
        problem = "batch_size < 1 or step < 0"
    if problem is None and not all(isinstance(w, str) for w in meta["trained_words"]):
        problem = '"trained_words" holds a non-string'
    wte = tensors.get("wte")
    if problem is None and (wte is None or wte.dim() != 2 or not wte.is_floating_point()):
        problem = "no 2-D floating-point tensor 'wte' in the .safetensors"
    if problem:
        raise DataError(f"{damaged}: {problem}; {fix}")
    try:
        vocab = WordVocab.from_dict(meta.pop("vocab"))
    except DataError as e:
        raise DataError(f"{damaged}: {e}; {fix}") from None
    state = {k[len("memory."):]: v for k, v in tensors.items() if k.startswith("memory.")}
    return state, wte, vocab, meta


class Conversation:
    """Conversations with a Seq2Seq model, one per batch row, turn by turn. Holds the memory state
    (the fast weights, separate per row) and the elastic vocabulary: a word the user types that the
    vocabulary lacks is added, with a new embedding row by the model's init rule, so the bot can read
    it and say it back. persist=False starts every turn from the initial memory (the no-memory
    baseline). With capacity, words added while chatting are pruned least recently used first; the
    words the model was trained with are kept."""

    def __init__(self, model, vocab, batch_size=1, persist=True, capacity=None, seed=0, step=0, source=None):
        self.model, self.vocab, self.persist, self.capacity = model, vocab, persist, capacity
        self.trained_words = list(vocab.words)
        # the model a saved conversation belongs to: the trained one, before any word is added
        self.fingerprint, self.source = model_fingerprint(model), source
        self.generator = torch.Generator().manual_seed(seed)
        self.step = step  # counts turns after training's last iteration, for the vocabulary's recency
        self.reset(batch_size)

    def reset(self, batch_size=None):
        self.batch_size = batch_size or self.batch_size
        self.state = self.model.initial_state(self.batch_size)

    @torch.no_grad()
    def turn(self, utterances, max_new_tokens=None):
        """One user utterance per row (None: that row skips the turn) -> the bot's replies (None for
        skipped rows)."""
        if len(utterances) != self.batch_size:
            raise ValueError(f"{len(utterances)} utterances for {self.batch_size} conversations")
        self.step += 1
        T = self.model.config.block_size
        words = [WordVocab.tokenize(u) if u is not None else [] for u in utterances]
        for ws in words:
            if len(ws) > T:
                print(f"warning: an utterance of {len(ws):,} words is longer than block_size {T}: its first "
                      f"{len(ws) - T:,} words were dropped (the model reads the last {T})")
        words = [ws[-T:] for ws in words]
        grow_vocab(self.vocab, self.model, [w for ws in words for w in ws], self.step, generator=self.generator)
        device = self.model.transformer.wte.weight.device
        src = torch.full((self.batch_size, max(1, max(map(len, words)))), self.vocab.pad, dtype=torch.long)
        for b, ws in enumerate(words):
            src[b, :len(ws)] = torch.tensor(self.vocab.encode_words(ws), dtype=torch.long)
        valid = torch.tensor([u is not None for u in utterances], device=device)
        enc, mask = self.model.encode(src.to(device))
        cross, cross_mask, self.state, _ = self.model.remember(enc, mask, self.state, valid, self.persist)
        out = self.model.reply(cross, cross_mask, max_new_tokens or self.model.config.block_size)
        replies = [self.vocab.decode(row) if u is not None else None for row, u in zip(out.tolist(), utterances)]
        if self.capacity is not None:
            prune_vocab(self.vocab, self.model, capacity=self.capacity, keep=self.trained_words)
        return replies

    def save(self, path):
        save_conversation(path, self.state, self.model.transformer.wte.weight, self.vocab.to_dict(),
                          {"step": self.step, "batch_size": self.batch_size, "trained_words": self.trained_words,
                           "model_fingerprint": self.fingerprint, "model": self.source})

    def load(self, path):
        """Restore a saved conversation: memory, vocabulary and the embedding rows of its words. Refused
        (nothing changed) when it belongs to another model or does not fit this one."""
        device = self.model.transformer.wte.weight.device
        state, wte, vocab, extra = load_conversation(path, device)
        saved = extra.get("model_fingerprint")
        if saved is None:
            print(f"warning: conversation {path} was saved before states carried their model's fingerprint: "
                  "it cannot be checked to belong to this model")
        elif saved != self.fingerprint:
            raise ConfigError(f"conversation {path} belongs to another model: it was saved with "
                              f"{extra.get('model') or 'a model'} (fingerprint {saved}), this is "
                              f"{self.source or 'a model'} (fingerprint {self.fingerprint}); load it with the "
                              "model it was saved with, or start a new conversation")
        if wte.size(1) != self.model.config.n_embd or wte.size(0) != len(vocab):
            raise ConfigError(f"conversation {path} does not fit this model (embedding {tuple(wte.shape)}, "
                              f"{len(vocab)} words, the model's width {self.model.config.n_embd})")
        if self.model.memory is not None:
            try:
                self.model.memory.check_state(state, extra["batch_size"])
            except ValueError as e:
                raise ConfigError(f"conversation {path} does not fit this model: {e}") from None
        self.vocab = vocab
        self.model.transformer.wte.weight = self.model.lm_head.weight = nn.Parameter(wte)
        self.model.config.vocab_size = wte.size(0)
        self.state, self.step, self.batch_size = state, extra["step"], extra["batch_size"]
        self.trained_words = extra["trained_words"]


# a dialogue turn's fields, and those a question adds (what eval_dialog reads)
TURN_FIELDS = {"user": str, "bot": str, "kind": str}
QUESTION_FIELDS = {"answer": str, "attribute": str, "fact_turn": int, "repeat": bool}


def dialog_problem(d) -> str | None:
    """What is wrong with one dialogue of a dialogs_*.jsonl file, or None."""
    if not d["turns"]:
        return '"turns" is empty'
    for i, t in enumerate(d["turns"]):
        problem = check_fields(t, TURN_FIELDS) if isinstance(t, dict) else "not an object"
        if problem is None and t["kind"] == "question":
            problem = check_fields(t, QUESTION_FIELDS)
        if problem:
            return f"turn {i}: {problem}"
    if not all(isinstance(e, str) for e in d["entities"]):
        return '"entities" holds a non-string'
    return None


def read_dialogs(path, limit=None, fix="run python prepare.py dialogs, or set eval_file") -> list[dict]:
    """The dialogues of a dialogs_*.jsonl file (prepare.py dialogs), every line checked."""
    dialogs = read_jsonl(path, {"turns": list, "entities": list}, "dialogues", fix, dialog_problem)
    return dialogs[:limit] if limit else dialogs


def eval_dialog(cfg, model, vocab, test_file):
    """Answers to the questions of held-out test dialogues, with the memory and without it (every turn
    from the initial memory), same model, same new-word rows. A question is answered when the reply
    contains its answer word ("recall") and, stricter, when the reply is the expected one ("exact").
    Broken down by number of facts, turns between fact and question, first or repeated question, the
    answer's attribute, and whether the answer word was new to the model (added while evaluating)."""
    dialogs = read_dialogs(test_file, cfg.eval_items)
    from tqdm import tqdm
    rows = []  # one per question
    for arm, persist in (("memory", True), ("no_memory", False)):
        conv = Conversation(copy.deepcopy(model), WordVocab.from_dict(vocab.to_dict()), persist=persist,
                            capacity=cfg.vocab_capacity, seed=cfg.seed)
        trained = set(conv.trained_words)
        k = 0
        for first in tqdm(range(0, len(dialogs), cfg.batch_size), desc=f"dialogues, {arm}", disable=None):
            batch = dialogs[first:first + cfg.batch_size]
            conv.reset(len(batch))
            for n in range(max(len(d["turns"]) for d in batch)):
                turns = [d["turns"][n] if n < len(d["turns"]) else None for d in batch]
                replies = conv.turn([t["user"] if t else None for t in turns])
                for d, t, reply in zip(batch, turns, replies):
                    if t is None or t["kind"] != "question":
                        continue
                    if arm == "memory":
                        rows.append({"question": t["user"], "answer": t["answer"], "expected": t["bot"],
                                     "attribute": t["attribute"], "repeat": t["repeat"],
                                     "distance": n - t["fact_turn"],
                                     "n_facts": sum(u["kind"] == "fact" for u in d["turns"]),
                                     "new_word": t["answer"] not in trained})
                    row = rows[k]
                    k += 1
                    row[arm] = {"reply": reply, "recall": t["answer"] in WordVocab.tokenize(reply),
                                "exact": WordVocab.tokenize(reply) == WordVocab.tokenize(t["bot"])}
    arms = ("memory", "no_memory")

    def accuracy(selected):
        return {arm: {m: sum(r[arm][m] for r in selected) / len(selected) for m in ("recall", "exact")}
                | {"n": len(selected)} for arm in arms} if selected else None

    def by(key, bucket=lambda v: v):
        values = sorted({bucket(r[key]) for r in rows}, key=str)
        return {str(v): accuracy([r for r in rows if bucket(r[key]) == v]) for v in values}

    summary = {"all": accuracy(rows), "n_facts": by("n_facts"), "distance": by("distance", lambda d: min(d, 6)),
               "repeat": by("repeat"), "new_word": by("new_word"), "attribute": by("attribute")}
    for arm in arms:
        s = summary["all"][arm]
        print(f"{arm:>9}: recall {s['recall']:.3f}, exact reply {s['exact']:.3f} over {len(rows)} questions")
    for key in ("repeat", "new_word"):
        for v, acc in summary[key].items():
            print(f"  {key}={v}: recall with memory {acc['memory']['recall']:.3f}, without "
                  f"{acc['no_memory']['recall']:.3f} ({acc['memory']['n']} questions)")
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4), sharey=True)
    panels = [("overall and by attribute", {"all": summary["all"], **summary["attribute"]}),
              ("by number of facts", summary["n_facts"]), ("by turns from fact to question (6 = 6+)",
                                                          summary["distance"]),
              ("repeated question / new word", {f"repeat={k}": v for k, v in summary["repeat"].items()}
               | {f"new={k}": v for k, v in summary["new_word"].items()})]
    for ax, (title, groups) in zip(axes, panels):
        names = list(groups)
        for j, (arm, colour) in enumerate((("memory", "#c63"), ("no_memory", "#999"))):
            ax.bar([i + 0.4 * j for i in range(len(names))], [groups[g][arm]["recall"] for g in names], 0.4,
                   color=colour, label=arm.replace("_", " "))
        ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=30, ha="right")
        ax.set_title(title)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("recall (answer word in the reply)")
    axes[0].legend(loc="lower left")
    return {"summary": summary, "questions": rows, "test_file": test_file, "dialogues": len(dialogs)}, fig


def run_chat(cfg, model, vocab, source=None, transcript=None):
    """Chat turn by turn, from cfg.chat_script (a file of user lines) or the keyboard. Lines starting
    with / are commands: /save PATH, /load PATH, /reset, /quit. A command or turn that fails (a mistyped
    path, a damaged file) is reported in one line and the chat goes on; however the chat ends (/quit, end
    of input, an error, Ctrl-C) the conversation is saved to cfg.chat_save. Returns the transcript (also
    appended to `transcript` as it goes, for a caller that must write it however the chat ends)."""
    conv = Conversation(model, vocab, capacity=cfg.vocab_capacity, seed=cfg.seed, source=source)
    if cfg.chat_load:  # nothing to lose yet: a failure here ends the chat before it starts
        conv.load(cfg.chat_load)
        print(f"loaded conversation {cfg.chat_load}")

    def keyboard():
        while True:
            try:
                yield input("you: ")
            except EOFError:
                return

    lines = keyboard()
    if cfg.chat_script:
        if not os.path.isfile(cfg.chat_script):
            raise ConfigError(f"chat_script {cfg.chat_script} not found: a text file, one user line per line")
        with open(cfg.chat_script, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    transcript = [] if transcript is None else transcript
    try:
        for line in lines:
            line = line.strip()
            if line == "/quit":
                break
            try:
                chat_line(conv, line, cfg.chat_script is not None, transcript)
            except Exception as e:  # never end (or lose) the conversation over one line
                known = isinstance(e, (ConfigError, DataError, OSError))
                message = first_line(e) if known else f"{type(e).__name__}: {first_line(e)}"
                print(f"error: {message} (the conversation goes on)")
    finally:
        if cfg.chat_save:
            conv.save(cfg.chat_save)
            print(f"saved conversation {cfg.chat_save}")
    return transcript


def chat_line(conv, line, echo, transcript):
    """One line of the chat: a command or a turn."""
    if not line:
        return
    command, _, arg = line.partition(" ")
    arg = arg.strip()
    if command in ("/save", "/load") and arg:
        if command == "/save":
            conv.save(arg)
            print(f"saved conversation {arg}")
        else:
            conv.load(arg)
            print(f"loaded conversation {arg}")
    elif command == "/reset":
        conv.reset()
        print("memory reset")
    elif command.startswith("/"):
        print("commands: /save PATH, /load PATH, /reset, /quit")
    else:
        reply = conv.turn([line])[0]
        if echo:
            print(f"you: {line}")
        print(f"bot: {reply}")
        transcript.append({"user": line, "bot": reply})
