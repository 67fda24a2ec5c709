"""
Training batches of a prepared dataset as a pure function of (seed, stream, index): the global
batch of iteration i is the same rows whatever the world size and however often the run was
resumed. Random windows (batch_offsets + get_batch) for ordinary language-model training;
document streams (DocStream) for models whose per-row memories read each document in order.
"""

import numpy as np
import torch

from prepare import DataError


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
    world size read the same rows."""

    def __init__(self, data, starts, n_rows: int, block_size: int, seed: int, shuffle: bool = True):
        self.data, self.T = data, block_size
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
        """x, y (len(rows), T) on device, and last (len(rows),) bool: the window ends its document."""
        T = self.T
        x = np.zeros((len(rows), T), dtype=np.int64)
        y = np.full((len(rows), T), -1, dtype=np.int64)
        last = np.zeros(len(rows), dtype=bool)
        for i, g in enumerate(rows):
            doc, w = self.locate(it, g)
            a = self.starts[doc] + w * T
            n = min(T, self.ends[doc] - 1 - a)  # positions with a next token in this document
            x[i, :n] = self.data[a:a + n]
            y[i, :n] = self.data[a + 1:a + 1 + n]
            last[i] = w == self.windows[doc] - 1
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if device.startswith("cuda"):
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device), torch.from_numpy(last)


def batch_offsets(seed: int, stream: int, index: int, n_rows: int, data_len: int, block_size: int):
    """Start offsets of the `index`-th batch of a stream (0 = training iterations, 1 = train-split
    eval, 2 = val-split eval): the same numbers on every rank and on every restart."""
    if data_len <= block_size:
        raise DataError(f"the split has {data_len} tokens, fewer than block_size + 1 = {block_size + 1}: "
                        "lower block_size or prepare more data")
    rng = np.random.default_rng([seed, stream, index])
    return rng.integers(0, data_len - block_size, size=n_rows)


