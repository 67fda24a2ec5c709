"""
Evaluate a trained model: perplexity of long documents with a memorizing layer at several memory
sizes (eval='ppl'), kNN-LM perplexity (eval='knnlm'), and the chatbot's recall of facts on held-out
dialogues (eval='dialog'). Each writes a JSON and a PNG to eval_out (default out_dir/eval_<eval>).

    python evaluate.py --out_dir=out-plays-knn --eval=ppl --eval_dataset=shakespeare_plays
    python evaluate.py --out_dir=out-plays --eval=knnlm --eval_dataset=shakespeare_plays --knnlm_dir=ds
    python evaluate.py config/eval_dialogs.py

Sampling, recall of facts and sentiment direction with the persistent kNN memory are sample.py's.
"""

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from chat import Seq2Seq, eval_dialog
from checkpoint import CheckpointError, load_model
from common import cli, pyplot, resolve_device, write_eval
from configurator import ConfigError, at_least, format_config, load_config, need, within
from knn import KNNLMDatastore, KNNMemoryError, KNNSettings, knn_probs, knnlm_mix, last_mlp_input
from memory import memorizing_layer
from prepare import DataError, check_meta_compatible, load_doc_starts, load_meta, open_split
from runs import CheckedSettings, not_empty

# what evaluate.py stops on with one line instead of a traceback
USER_ERRORS = (ConfigError, DataError, CheckpointError, KNNMemoryError, OSError)


@dataclass
class EvalConfig(CheckedSettings):
    init_from: str = "resume"  # 'resume' (out_dir/ckpt.pt), or pretrained weights (see model.GPT.from_pretrained)
    out_dir: str = "out"
    eval: str = "ppl"  # 'ppl', 'knnlm' or 'dialog'
    eval_out: str | None = None  # folder for the JSON and the plot; default out_dir/eval_<eval>
    seed: int = 1337
    batch_size: int = 8  # documents (ppl) or dialogues (dialog) side by side
    device: str = "auto"
    dtype: str = "auto"
    # perplexity of long documents: a dataset prepared with document boundaries in data_dir; its val split is scored
    eval_dataset: str | None = None
    data_dir: str = "data"
    eval_memory_sizes: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536])  # ppl: entries per row, head
    eval_context: bool = False  # ppl: read train document i (unscored) before val document i (shakespeare_plays:
    # the beginning of the same play)
    eval_baseline: str | None = None  # ppl: out_dir of a model trained without the layer, scored on the same text
    eval_tokens: int | None = None  # knnlm: score only the first N val tokens
    # kNN-LM: p = lambda p_kNN + (1 - lambda) p_LM over a datastore of (last block's MLP input, next token); the
    # search backend is knn_backend (+ knn_nlist, knn_nprobe) from the memory settings
    knnlm_dir: str | None = None  # datastore folder: loaded, or built from eval_dataset's train split and saved here
    knnlm_max_tokens: int | None = None  # build from the first N train tokens only
    knnlm_lambdas: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])
    knnlm_k: int = 64  # neighbours
    knnlm_temperature: float = 1.0  # p_kNN = softmax(-squared distance / temperature)
    memory_force: bool = False  # use a datastore built by other weights anyway
    # the chatbot (a checkpoint of train.py task='dialog'): held-out dialogues
    eval_file: str | None = None  # default data/dialogs/dialogs_test.jsonl
    eval_items: int | None = None  # only the first N dialogues
    vocab_capacity: int | None = None  # at most this many words: those added while chatting go LRU first

    def validate(self):
        """Every setting in its allowed range, before any work."""
        super().validate()
        need(self.eval in ("ppl", "knnlm", "dialog"), f"eval={self.eval!r} is not allowed: eval must be 'ppl', "
             "'knnlm' or 'dialog' (recall and sentiment are sample.py's)")
        not_empty(self, "eval_dataset", "data_dir", "eval_baseline")
        need(bool(self.eval_memory_sizes), "eval_memory_sizes=[] is empty: give the memory sizes to compare, "
             "e.g. [1024, 4096]")
        at_least(self, 1, "eval_memory_sizes")
        at_least(self, 2, "eval_tokens", "knnlm_max_tokens")
        within(self, 0, 1, "knnlm_lambdas")


def split_documents(data_dir: str, split: str) -> list:
    """The documents of a prepared split, as int64 arrays."""
    meta = load_meta(data_dir)
    data = open_split(data_dir, split, meta)
    starts = load_doc_starts(data_dir, split, len(data))
    ends = list(starts[1:]) + [len(data)]
    return [np.asarray(data[a:b], dtype=np.int64) for a, b in zip(starts, ends)]


def eval_dataset_dir(cfg, meta) -> str:
    if not cfg.eval_dataset:
        raise ConfigError(f"eval={cfg.eval!r} needs eval_dataset: a dataset prepared with document boundaries, "
                          "e.g. shakespeare_plays")
    path = os.path.join(cfg.data_dir, cfg.eval_dataset)
    check_meta_compatible(meta, load_meta(path))
    return path


@torch.no_grad()
def document_nll(model, docs, contexts, batch_size, device) -> tuple[float, int]:
    """(summed NLL, scored tokens) of every document read window after window of block_size, as in
    training; a memorizing layer keeps each row's earlier windows. contexts[i] (or None) is read
    before docs[i], unscored (its windows only write the memory). Rows are aligned so that their
    documents start in the same window: a context loses its first len % block_size tokens, and
    shorter ones are preceded by whole windows of padding, which are wiped from the memory."""
    T = model.config.block_size
    mem = memorizing_layer(model)
    total, count = 0.0, 0
    for first in tqdm(range(0, len(docs), batch_size), desc="documents", disable=None, leave=False):
        group = range(first, min(first + batch_size, len(docs)))
        ctx = [contexts[i][len(contexts[i]) % T:] if contexts else docs[i][:0] for i in group]
        lead = [max(len(c) for c in ctx) - len(c) for c in ctx]  # whole windows of padding
        n = max(ld + len(c) + len(docs[i]) - 1 for ld, c, i in zip(lead, ctx, group))
        X = torch.zeros(len(group), n, dtype=torch.long)
        Y = torch.full((len(group), n), -1, dtype=torch.long)
        for r, (ld, c, i) in enumerate(zip(lead, ctx, group)):
            sq = np.concatenate([c, docs[i]])
            X[r, ld:ld + len(sq) - 1] = torch.from_numpy(sq[:-1])
            k = max(len(c) - 1, 0)  # predictions before this one are context
            Y[r, ld + k:ld + len(sq) - 1] = torch.from_numpy(sq[k + 1:])
        if mem is not None:
            mem.reset()
        for w in range(0, n, T):
            x, y = X[:, w:w + T].to(device), Y[:, w:w + T].to(device)
            scored = bool((y >= 0).any())
            if not scored and mem is None:
                continue  # context with nothing that remembers it
            if mem is not None:
                mem.read = scored  # unscored windows only fill the memory
            logits, _ = model(x, y)
            if mem is not None:
                mem.clear_rows(torch.tensor([w + T <= ld for ld in lead]))  # padding is not context
            total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                                     reduction="sum").item()
            count += int((y >= 0).sum())
    if mem is not None:
        mem.read = True
        mem.reset()
    return total, count


def eval_ppl(cfg, model, meta, device) -> tuple[dict, object]:
    """Perplexity of eval_dataset's val documents: the model with its memorizing layer at every size in
    eval_memory_sizes and with the layer off, and eval_baseline's model, on the same tokens."""
    path = eval_dataset_dir(cfg, meta)
    docs = split_documents(path, "val")
    contexts = split_documents(path, "train") if cfg.eval_context else None
    if contexts is not None and len(contexts) != len(docs):
        raise ConfigError(f"eval_context pairs train and val documents, but {path} has {len(contexts)} and {len(docs)}")
    layer = memorizing_layer(model)
    if layer is None:
        raise ConfigError("eval='ppl' compares memory sizes of a memorizing layer; this model has none "
                          "(train with knn_layer=L, loader='docs')")
    rows = []

    def score(name, m, size):
        nll, n = document_nll(m, docs, contexts, cfg.batch_size, device)
        rows.append({"model": name, "memory": size, "nll": nll / n, "ppl": math.exp(nll / n), "tokens": n})
        print(f"{name:>8} model, memory {size:>6}: loss {nll / n:.4f}, perplexity {math.exp(nll / n):.3f} ({n:,} tokens)")

    attn = model.attentions[model.memory_args["knn_layer"]]
    attn.memory = None  # the layer off: plain attention at layer L
    score("memory", model, 0)
    attn.memory = layer
    for size in cfg.eval_memory_sizes:
        layer.size = size
        score("memory", model, size)
    if cfg.eval_baseline:
        base, *_ = load_model("resume", cfg.eval_baseline, device)
        score("baseline", base, 0)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    mem_rows = [r for r in rows if r["model"] == "memory" and r["memory"] > 0]
    ax.plot([r["memory"] for r in mem_rows], [r["ppl"] for r in mem_rows], "o-", label="memorizing layer")
    ax.axhline(rows[0]["ppl"], color="#999", ls=":", label="same model, layer off")
    for r in rows:
        if r["model"] == "baseline":
            ax.axhline(r["ppl"], color="#c63", ls="--", label="trained without memory")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory entries per row and head (tokens)")
    ax.set_ylabel("val perplexity")
    ax.set_title(f"{cfg.eval_dataset}: {rows[0]['tokens']:,} tokens" + (" after their context" if contexts else ""))
    ax.legend()
    ax.grid(alpha=0.3)
    return {"rows": rows, "documents": len(docs)}, fig


@torch.no_grad()
def eval_knnlm(cfg, model, meta, device) -> tuple[dict, object]:
    """Perplexity of eval_dataset's val split (first eval_tokens tokens, windows of block_size) with
    the plain model and with kNN-LM at every lambda in knnlm_lambdas."""
    store = knnlm_datastore(cfg, model, meta)
    path = eval_dataset_dir(cfg, meta)
    data = np.asarray(open_split(path, "val", load_meta(path))[:cfg.eval_tokens], dtype=np.int64)
    T = model.config.block_size
    lambdas = [0.0] + [l for l in cfg.knnlm_lambdas if l > 0]
    nll = {l: 0.0 for l in lambdas}
    n = 0
    seconds = {"plain": 0.0, "knnlm": 0.0}
    for s in tqdm(range(0, len(data) - 1, T), desc="knnlm", disable=None):
        x = torch.from_numpy(data[s:s + T][None, :len(data) - 1 - s]).to(device)
        y = torch.from_numpy(data[s + 1:s + 1 + x.size(1)][None]).to(device)
        t0 = time.perf_counter()
        h, logits = last_mlp_input(model, x)
        t1 = time.perf_counter()
        seconds["plain"] += t1 - t0
        p_knn = knn_probs(h, store, cfg.knnlm_k, cfg.knnlm_temperature, logits.size(-1))  # searched once
        for lam in lambdas:
            lp = knnlm_mix(logits, p_knn, lam)
            nll[lam] -= lp.gather(-1, y[..., None]).sum().item()
        seconds["knnlm"] += time.perf_counter() - t0
        n += y.numel()
    rows = [{"lambda": l, "nll": nll[l] / n, "ppl": math.exp(nll[l] / n)} for l in lambdas]
    for r in rows:
        print(f"lambda {r['lambda']:.2f}: loss {r['nll']:.4f}, perplexity {r['ppl']:.3f} ({n:,} tokens)")
    # kNN-LM time: the same forward pass, the search, and the mix for every lambda
    speed = {"plain_tok_s": n / seconds["plain"], "knnlm_tok_s": n / seconds["knnlm"]}
    print(f"scoring speed: plain {speed['plain_tok_s']:,.0f} tok/s, kNN-LM {speed['knnlm_tok_s']:,.0f} tok/s")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["lambda"] for r in rows], [r["ppl"] for r in rows], "o-")
    ax.set_xlabel("lambda (weight of p_kNN)")
    ax.set_ylabel("val perplexity")
    ax.set_title(f"kNN-LM, {len(store):,} entries, k={cfg.knnlm_k}, {n:,} tokens")
    ax.grid(alpha=0.3)
    return {"rows": rows, "tokens": n, "datastore": len(store), "backend": store.backend, "speed": speed}, fig


def knnlm_datastore(cfg, model, meta) -> KNNLMDatastore:
    """The datastore in knnlm_dir, built from eval_dataset's train split (and saved there) when it is not there."""
    if not cfg.knnlm_dir:
        raise ConfigError("kNN-LM needs knnlm_dir: a datastore folder (built there from eval_dataset's train split)")
    dataset = eval_dataset_dir(cfg, meta) if not os.path.isdir(cfg.knnlm_dir) else None
    return KNNLMDatastore.open_or_build(cfg.knnlm_dir, model, KNNSettings.from_config(cfg), meta, dataset,
                                        cfg.knnlm_max_tokens, cfg.memory_force)


def main(cfg: EvalConfig) -> dict:
    """Run the evaluation cfg.eval asks for; returns its result (also written as JSON and PNG)."""
    cfg.validate()  # load_config ran it already; an EvalConfig built in code gets it here
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    print(f"settings:\n{format_config(cfg)}")
    model, tokenizer, meta, source = load_model(cfg.init_from, cfg.out_dir, device)
    if (cfg.eval == "dialog") != isinstance(model, Seq2Seq):
        raise ConfigError(f"eval='dialog' is for a seq2seq chatbot (train.py task='dialog') and eval='ppl'/'knnlm' "
                          f"for a GPT; {source} is {'a seq2seq chatbot' if isinstance(model, Seq2Seq) else 'a GPT'}")
    if cfg.eval == "dialog":
        test_file = cfg.eval_file or os.path.join("data", "dialogs", "dialogs_test.jsonl")
        return write_eval(cfg, source, *eval_dialog(cfg, model, tokenizer, test_file))
    evaluate = {"ppl": eval_ppl, "knnlm": eval_knnlm}[cfg.eval]
    return write_eval(cfg, source, *evaluate(cfg, model, meta, device))


if __name__ == "__main__":
    cli(main, lambda: load_config(EvalConfig), USER_ERRORS)
