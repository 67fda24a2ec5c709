"""
Training batches as a pure function of (seed, stream, index): the global batch of iteration i is
the same rows whatever the world size and however often the run was resumed. Random windows
(batch_offsets + get_batch) for ordinary language-model training; document streams (DocStream)
for models whose per-row memories read each document in order; whole dialogues for the seq2seq
chatbot (chat.DialogBatches).

train.py's loop reads its data through one interface, Source, with a class per kind of data:
RandomWindows, DocStreams (per-row memories: row slices, resets at document ends, the MNM write
loss, the memories in the checkpoint) and Dialogs (the elastic vocabulary, grown and pruned
before a step, slot rows, the vocabulary in the checkpoint). Layout says how a global batch is
shared out over processes and micro-steps.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F

from chat import DialogBatches, grow_vocab, prune_vocab
from common import print0, seeded_generator
from configurator import ConfigError
from memory import MNM, mnm_block, row_memories
from prepare import DataError, WordVocab, answer_positions, load_doc_starts, open_split


def get_batch(data, rows, block_size, device):
    """rows: start offsets. Returns x, y (len(rows), block_size) int64 on device."""
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in rows]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in rows]).astype(np.int64))
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class DocStream:
    """Document-contiguous batches. Global row g of the n_rows rows of a global batch reads the
    documents order[g], order[g + n_rows], order[g + 2 n_rows], ... (order is a permutation drawn
    from seed, or the file's order when shuffle is False), so the rows share out every document
    once, then start their lists again. Each document is read from its start, one window of
    block_size after another: at iteration i a row reads the i-th window of its endless sequence.
    Windows never cross a document end; the last one of a document is padded (targets -1, ignored
    by the loss). Like batch_offsets, a pure function of (seed, iteration): resumed runs and any
    world size read the same rows. answers: sorted offsets of the tokens that spell a query's answer
    (prepare.answer_positions), marked in each batch for the answer loss."""

    def __init__(self, data, starts, n_rows: int, block_size: int, seed: int, shuffle: bool = True,
                 answers: np.ndarray | None = None):
        self.data, self.T = data, block_size
        self.answers = answers if answers is not None else np.zeros(0, dtype=np.int64)
        ends = np.r_[starts[1:], len(data)]
        keep = ends - starts >= 2  # a document needs a token to predict
        self.starts, self.ends = starts[keep], ends[keep]
        if len(self.starts) == 0:
            raise DataError("no document has two tokens or more: prepare a dataset of longer documents")
        self.windows = -(-(self.ends - self.starts - 1) // block_size)  # per document, ceil((len - 1) / T)
        n = len(self.starts)
        if n < n_rows:
            raise DataError(f"{n} documents for {n_rows} batch rows (gradient_accumulation_steps x batch_size): "
                            "every row needs a document of its own; use fewer rows or more documents")
        order = np.random.default_rng([seed, 3]).permutation(n) if shuffle else np.arange(n)
        self.docs = [order[g::n_rows] for g in range(n_rows)]
        self.cum = [np.r_[0, np.cumsum(self.windows[d])] for d in self.docs]  # windows before each document

    def locate(self, it: int, row: int):
        """(document, window within it) that global row `row` reads at iteration it."""
        cum = self.cum[row]
        r = it % cum[-1]
        j = int(np.searchsorted(cum, r, side="right")) - 1
        return int(self.docs[row][j]), int(r - cum[j])

    def batch(self, it: int, rows, device: str):
        """x, y (len(rows), T) on device; last (len(rows),) bool: the window ends its document; ans
        (len(rows), T) bool on device: the target is a token of a query's answer."""
        T = self.T
        x = np.zeros((len(rows), T), dtype=np.int64)
        y = np.full((len(rows), T), -1, dtype=np.int64)
        ans = np.zeros((len(rows), T), dtype=bool)
        last = np.zeros(len(rows), dtype=bool)
        for i, g in enumerate(rows):
            doc, w = self.locate(it, g)
            a = self.starts[doc] + w * T
            n = min(T, self.ends[doc] - 1 - a)  # positions with a next token in this document
            x[i, :n] = self.data[a:a + n]
            y[i, :n] = self.data[a + 1:a + 1 + n]
            lo, hi = np.searchsorted(self.answers, [a + 1, a + 1 + n])
            ans[i, self.answers[lo:hi] - (a + 1)] = True
            last[i] = w == self.windows[doc] - 1
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if device.startswith("cuda"):
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device), torch.from_numpy(last), torch.from_numpy(ans).to(device)


def batch_offsets(seed: int, stream: int, index: int, n_rows: int, data_len: int, block_size: int):
    """Start offsets of the `index`-th batch of a stream (0 = training iterations, 1 = train-split
    eval, 2 = val-split eval): the same numbers on every rank and on every restart."""
    if data_len <= block_size:
        raise DataError(f"the split has {data_len} tokens, fewer than block_size + 1 = {block_size + 1}: "
                        "lower block_size or prepare more data")
    rng = np.random.default_rng([seed, stream, index])
    return rng.integers(0, data_len - block_size, size=n_rows)


def check_token_ids(data, vocab_size: int, where: str, chunk: int = 1 << 24):
    """Refuse data holding a token id >= vocab_size (meta.json's), scanning the split in chunks."""
    top = max((int(data[i:i + chunk].max()) for i in range(0, len(data), chunk)), default=-1)
    if top >= vocab_size:
        raise DataError(f"{where} holds token id {top}, but its meta.json says vocab_size={vocab_size}: the data "
                        "and meta.json do not match; prepare the dataset again (python prepare.py ...)")


# -----------------------------------------------------------------------------
# the data sources of train.py's loop

@dataclass
class Layout:
    """How a global batch is shared out: world_size processes, each micro_steps micro-steps of
    batch_size rows. Global row (rank * micro_steps + micro) * batch_size + b is row b of this rank's
    micro-step micro. device and ctx (autocast) are where and how the model runs."""
    rank: int
    world_size: int
    micro_steps: int
    batch_size: int
    device: str
    ctx: object
    ddp: bool = False

    @property
    def global_rows(self) -> int:
        return self.world_size * self.micro_steps * self.batch_size

    @property
    def local_rows(self) -> int:  # this rank's rows: every micro-step's batch rows
        return self.micro_steps * self.batch_size

    def first_row(self, micro: int) -> int:
        return (self.rank * self.micro_steps + micro) * self.batch_size

    def all_reduce(self, t):
        if self.ddp:
            dist.all_reduce(t)
        return t

    def gather(self, obj) -> list:
        """obj of every rank, in rank order."""
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


class Source:
    """The data of a training run, as train.py's loop asks for it. name: the checkpoint's sampler
    'loader'; vocab_size: the token ids a new model needs."""
    name = ""

    def __init__(self, layout: Layout, seed: int, eval_iters: int):
        self.layout, self.seed, self.eval_iters = layout, seed, eval_iters

    def bind(self, model):
        """The (unwrapped) model the run trains, once, before its optimizer is made."""
        self.model = model

    def before_step(self, it: int, optimizer) -> bool:
        """Called before iteration it's micro-steps; True when it changed the model's parameters (the loop
        wraps the model again)."""
        return False

    def batch(self, it: int, micro: int):
        """The inputs of this rank's micro-step micro of iteration it (after before_step(it))."""
        raise NotImplementedError

    def loss(self, model, batch):
        """The mean loss of a micro-step's batch; model: the one the step calls (compiled, DDP)."""
        raise NotImplementedError

    def estimate_loss(self, model) -> dict:
        """{'train': loss, 'val': loss} on fixed evaluation batches, the same on every rank (model in eval mode)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What the checkpoint keeps of the source, at its top level (a collective: every rank calls it)."""
        return {}

    def load_state_dict(self, ckpt: dict):
        """Take the source's state back from a checkpoint (after bind)."""


class Sampled(Source):
    """Batches of independent rows drawn per iteration: draw(split, stream, index, n_rows) picks rows
    (stream 0: training iterations, 1: train-split eval, 2: val-split eval), tensors(split, rows, key)
    makes the model's inputs, key = (stream, index, first row) seeding any random part."""

    def before_step(self, it, optimizer):
        self.rows = self.draw("train", 0, it, self.layout.global_rows)  # the whole global batch, every rank
        return False

    def batch(self, it, micro):
        lo = self.layout.first_row(micro)
        return self.tensors("train", self.rows[lo:lo + self.layout.batch_size], (0, it, lo))

    def loss(self, model, batch):
        with self.layout.ctx:
            return model(*batch)[1]

    @torch.no_grad()
    def estimate_loss(self, model):
        """Mean loss over eval_iters fixed batches per split, shared out over the ranks."""
        out, L = {}, self.layout
        for stream, split in ((1, "train"), (2, "val")):
            total = torch.zeros((), device=L.device)
            for k in range(L.rank, self.eval_iters, L.world_size):
                total += self.loss(model, self.tensors(split, self.draw(split, stream, k, L.batch_size),
                                                       (stream, k, 0))).float()
            out[split] = L.all_reduce(total).item() / self.eval_iters
        return out


class RandomWindows(Sampled):
    """Windows of block_size + 1 tokens at random offsets of a prepared dataset (batch_offsets)."""
    name = "random"

    def __init__(self, data_path, meta, layout, seed, eval_iters):
        super().__init__(layout, seed, eval_iters)
        self.splits = open_checked(data_path, meta)
        self.meta, self.vocab_size = meta, meta["vocab_size"]

    def bind(self, model):
        super().bind(model)
        check_model_vocab(model, self.meta)
        self.block_size = model.config.block_size

    def draw(self, split, stream, index, n_rows):
        return batch_offsets(self.seed, stream, index, n_rows, len(self.splits[split]), self.block_size)

    def tensors(self, split, rows, key):
        return get_batch(self.splits[split], rows, self.block_size, self.layout.device)


class Dialogs(Sampled):
    """Whole dialogues for the seq2seq chatbot (chat.DialogBatches). Before every step the words of
    the global batch grow the elastic vocabulary (every rank sees them all, so all grow alike), and
    every prune_every steps the rarely or long unseen words are pruned; the model's embedding
    Parameter then changes. Each dialogue's fact words get slot rows drawn from a generator seeded by
    its batch's key. The vocabulary goes into the checkpoint."""
    name = "dialogs"

    def __init__(self, data_path, layout, seed, eval_iters, n_slots, block_size, prune: tuple):
        super().__init__(layout, seed, eval_iters)
        self.dialogs = DialogBatches(data_path, seed, n_slots, block_size)
        self.vocab = WordVocab()  # starts with the special tokens; grows as the batches bring words
        self.vocab_size = len(self.vocab)
        self.prune_every, self.min_count, self.capacity = prune

    def before_step(self, it, optimizer):
        super().before_step(it, optimizer)
        pruned = []
        if self.prune_every and it and it % self.prune_every == 0:
            pruned = prune_vocab(self.vocab, self.model, self.min_count, self.capacity, optimizer)
        new = grow_vocab(self.vocab, self.model, DialogBatches.words(self.rows), it, optimizer,
                         seeded_generator(self.seed, 3, it))
        if new or pruned:
            print0(f"iter {it}: vocabulary {len(self.vocab)} words (+{len(new)}, -{len(pruned)})")
        return bool(new or pruned)

    def draw(self, split, stream, index, n_rows):
        return self.dialogs.draw(split, stream, index, n_rows)

    def tensors(self, split, rows, key):
        return self.dialogs.tensors(rows, self.vocab, self.model.transformer.wte.weight,
                                    seeded_generator(self.seed, *key), self.layout.device)

    def state_dict(self):
        return {"vocab": self.vocab.to_dict()}

    def load_state_dict(self, ckpt):
        self.vocab = WordVocab.from_dict(ckpt["vocab"])


class DocStreams(Source):
    """Every batch row reads its own documents window after window (DocStream), for the per-row
    memories of a GPT (memory.row_memories: a memorizing layer, an MNM block). Each micro-step's rows
    use their own slice of the memory rows; a row's memory empties when its document ends; training
    adds the MNM's write loss, and answer_loss > 0 the mean loss over the batch's answer tokens (of a
    long-range dataset's queries) times answer_loss. The memories of every rank go into the checkpoint,
    in global row order."""
    name = "docs"

    def __init__(self, data_path, meta, layout, seed, eval_iters, answer_loss: float = 0.0):
        super().__init__(layout, seed, eval_iters)
        self.splits = open_checked(data_path, meta)
        self.starts = {s: load_doc_starts(data_path, s, len(d)) for s, d in self.splits.items()}
        self.meta, self.vocab_size = meta, meta["vocab_size"]
        self.answer_loss = answer_loss
        self.answers = answer_positions(data_path, "train", meta) if answer_loss > 0 else None

    def bind(self, model):
        super().bind(model)
        check_model_vocab(model, self.meta)
        L, T = self.layout, model.config.block_size
        self.streams = {s: DocStream(self.splits[s], self.starts[s], L.global_rows, T, self.seed, shuffle=s == "train",
                                  answers=self.answers if s == "train" else None)
                        for s in self.splits}
        self.mems, self.mnm = row_memories(model), mnm_block(model)
        for m in self.mems.values():
            m.reset(L.local_rows)

    def window(self, split, it, micro):
        lo = self.layout.first_row(micro)
        return (*self.streams[split].batch(it, range(lo, lo + self.layout.batch_size), self.layout.device), micro)

    def batch(self, it, micro):
        return self.window("train", it, micro)

    def loss(self, model, batch, train=True):
        """Forward one micro-step's rows with their memory rows; rows whose document ended start empty."""
        X, Y, last, ans, micro = batch
        B = self.layout.batch_size
        for m in self.mems.values():
            m.rows = slice(micro * B, (micro + 1) * B)
        with self.layout.ctx:
            logits, loss = model(X, Y)
            if train and self.mnm is not None:  # the MNM's write path learns from its write loss
                loss = loss + MNM.write_loss_weight * self.mnm.write_loss
            if train and self.answer_loss > 0:  # a few answer tokens among many predictable ones: weigh them up
                nll = F.cross_entropy(logits[ans].float(), Y[ans], reduction="sum") / ans.sum().clamp(min=1)
                loss = loss + self.answer_loss * nll
        for m in self.mems.values():
            m.clear_rows(micro * B + last.nonzero().squeeze(1))
        return loss

    @torch.no_grad()
    def estimate_loss(self, model):
        """Loss per token over the first eval_iters iterations of each split's document stream (in file
        order, laid out like training batches; weighted by tokens, as the last window of a document is
        short), every row's memory starting empty; the training memories are put back afterwards."""
        L, out = self.layout, {}
        saved = {name: m.get_state() for name, m in self.mems.items()}
        for split in self.splits:
            for m in self.mems.values():
                m.reset(L.local_rows)
            total = torch.zeros(2, device=L.device)  # summed loss, tokens
            for k in range(self.eval_iters):
                for micro in range(L.micro_steps):
                    batch = self.window(split, k, micro)
                    n = (batch[1] >= 0).sum()
                    total += torch.stack([self.loss(model, batch, train=False).float() * n, n.float()])
            total = L.all_reduce(total)
            out[split] = (total[0] / total[1]).item()
        for name, m in self.mems.items():
            m.reset(L.local_rows)
            m.set_state(saved[name])
        return out

    def state_dict(self):
        """Every rank's memory rows, in global row order (a collective: every rank calls it)."""
        out = {}
        for name, m in self.mems.items():
            parts = self.layout.gather({k: v.cpu() for k, v in m.get_state().items()})
            out[name] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts[0] else {}
        return out

    def load_state_dict(self, ckpt):
        L = self.layout
        for name, m in self.mems.items():
            state = ckpt.get(name)  # rows of the whole global batch, in global row order
            if not state:
                continue
            n = next(iter(state.values())).size(0)
            if n != L.global_rows:
                raise ConfigError(f"the checkpoint holds memories of {n} batch rows, this run has {L.global_rows}: "
                                  "resume with the batch_size and gradient_accumulation_steps it was trained with")
            lo = L.rank * L.local_rows
            m.set_state({k: v[lo:lo + L.local_rows].to(L.device) for k, v in state.items()})


def open_checked(data_path, meta) -> dict:
    """The train and val splits, checked against meta.json's vocab_size."""
    splits = {s: open_split(data_path, s, meta) for s in ("train", "val")}
    for s, data in splits.items():
        check_token_ids(data, meta["vocab_size"], f"{data_path}/{s}.bin")
    return splits


def check_model_vocab(model, meta):
    if model.config.vocab_size < meta["vocab_size"]:
        raise DataError(f"meta.json says vocab_size={meta['vocab_size']}, more token ids than the model's "
                        f"{model.config.vocab_size}: train on data prepared with the model's tokenizer, or start "
                        "a new model (init_from='scratch')")
