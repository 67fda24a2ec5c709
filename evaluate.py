"""
Evaluate a trained model: perplexity of long documents with a memorizing layer at several memory
sizes (eval='ppl'), kNN-LM perplexity (eval='knnlm'), and the chatbot's recall of facts on held-out
dialogues (eval='dialog'), and long-range recall by distance of checkpoints and untrained memories
(eval='longrange'). Each writes a JSON and a PNG to eval_out (default out_dir/eval_<eval>).

    python evaluate.py --out_dir=out-plays-knn --eval=ppl --eval_dataset=shakespeare_plays
    python evaluate.py --out_dir=out-plays --eval=knnlm --eval_dataset=shakespeare_plays --knnlm_dir=ds
    python evaluate.py config/eval_dialogs.py
    python evaluate.py config/eval_passkey.py

Sampling, recall of facts and sentiment direction with the persistent kNN memory are sample.py's.
"""

import json
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
from configurator import ConfigError, at_least, format_config, load_config, need, one_of, within
from knn import KNNLMDatastore, KNNMemory, KNNMemoryError, KNNSettings, knn_probs, knnlm_mix, last_mlp_input
from memory import MemorizingMemory, memorizing_layer, mnm_block, row_memories
from prepare import DataError, check_meta_compatible, load_meta, longrange_documents, open_split, split_documents
from runs import CheckedSettings, not_empty

# what evaluate.py stops on with one line instead of a traceback
USER_ERRORS = (ConfigError, DataError, CheckpointError, KNNMemoryError, OSError)


@dataclass
class EvalConfig(CheckedSettings):
    init_from: str = "resume"  # 'resume' (out_dir/ckpt.pt), or pretrained weights (see model.GPT.from_pretrained)
    out_dir: str = "out"
    eval: str = "ppl"  # 'ppl', 'knnlm', 'dialog' or 'longrange'
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
    # long-range recall (eval='longrange'): accuracy by distance on eval_dataset's val documents (passkey,
    # facts_long: prepared with longrange_val.jsonl); eval_items: only the first N documents
    out_dirs: list[str] = field(default_factory=list)  # checkpoints, one arm each, read window after window
    longrange_arms: list[str] = field(default_factory=lambda: ["checkpoints", "knn", "knnlm"])  # 'knn': the
    # persistent kNN memory (settings knn, knn_query, ...) holding the document's earlier windows, 'knnlm': kNN-LM
    # over the document's own past (knnlm_k, knnlm_temperature, one arm per lambda in knnlm_lambdas); both untrained,
    # on longrange_base's model
    longrange_base: str | None = None  # default: the first of out_dirs whose model has no trainable memory
    # longrange: the entries each query of a memorizing layer attends to (None: the checkpoint's knn_topk); no
    # weight depends on it, so a trained layer can be read with a wider retrieval
    eval_knn_topk: int | None = None
    # longrange, rotary models: the distance in tokens at which a memorizing layer scores its entries (None: the
    # checkpoint's knn_distance; memory.MemoryConfig); no weight depends on it either
    eval_knn_distance: int | None = None

    def validate(self):
        """Every setting in its allowed range, before any work."""
        super().validate()
        need(self.eval in ("ppl", "knnlm", "dialog", "longrange"), f"eval={self.eval!r} is not allowed: eval must be "
             "'ppl', 'knnlm', 'dialog' or 'longrange' (recall and sentiment are sample.py's)")
        not_empty(self, "eval_dataset", "data_dir", "eval_baseline", "longrange_base")
        need(self.eval != "longrange" or bool(self.out_dirs), "out_dirs=[] is empty: eval='longrange' needs the "
             "checkpoints to compare, e.g. out_dirs=['out-passkey-base', 'out-passkey-knn']")
        one_of(self, "longrange_arms", ("checkpoints", "knn", "knnlm"))
        need(bool(self.eval_memory_sizes), "eval_memory_sizes=[] is empty: give the memory sizes to compare, "
             "e.g. [1024, 4096]")
        at_least(self, 1, "eval_memory_sizes")
        at_least(self, 2, "eval_tokens", "knnlm_max_tokens")
        at_least(self, 1, "eval_knn_topk")
        at_least(self, 0, "eval_knn_distance")
        within(self, 0, 1, "knnlm_lambdas")


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


# ---- long-range recall (eval='longrange') ----

@torch.no_grad()
def windowed_pass(model, docs: list, batch_size: int, device, keep: list | None = None, on_window=None):
    """Greedy next-token predictions at every position of each document (int64 arrays), read as training
    reads them: windows of block_size from the document's start, each batch row's trainable memories
    (memorizing layer, MNM block) starting empty with its document. Returns a list of (n - 1,) int arrays;
    with keep (positions per document) also, per document, the last block's MLP input at every position
    (the kNN-LM key, (n - 1, n_embd)) and the logits at the kept positions."""
    T = model.config.block_size
    mems = list(row_memories(model).values())
    preds, hs, kept = [None] * len(docs), [None] * len(docs), [None] * len(docs)
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    for g in range(0, len(order), batch_size):
        group = order[g:g + batch_size]
        n = max(len(docs[i]) for i in group) - 1
        X = torch.zeros(len(group), n, dtype=torch.long)
        for r, i in enumerate(group):
            X[r, :len(docs[i]) - 1] = torch.from_numpy(docs[i][:-1])
        for m in mems:
            m.reset()
        out, hout, lout = [], [], []
        for w in range(0, n, T):
            x = X[:, w:w + T].to(device)
            if on_window is not None:  # diagnostics: which documents' window w is read next
                on_window(w, group)
            if keep is not None:
                h, logits = last_mlp_input(model, x, x)
                hout.append(h.float().cpu())
                lout.append(logits.float().cpu())
            else:
                logits, _ = model(x, x)  # targets: logits at every position
            out.append(logits.argmax(-1).cpu())
        P = torch.cat(out, 1).numpy()
        for r, i in enumerate(group):
            preds[i] = P[r, :len(docs[i]) - 1]
        if keep is not None:
            H = torch.cat(hout, 1)
            for r, i in enumerate(group):
                hs[i] = H[r, :len(docs[i]) - 1]
                pos = torch.as_tensor(keep[i], dtype=torch.long)
                kept[i] = torch.cat([lg[r:r + 1] for lg in lout], 1)[0, pos]
        del hout, lout
    for m in mems:
        m.reset()
    return (preds, hs, kept) if keep is not None else preds


def answer_positions(doc) -> list[int]:
    """The positions whose next-token prediction is an answer token, in order."""
    return sorted({int(s) - 1 for q in doc["queries"] for s in q["span"]})


def score_queries(docs: list, preds: list) -> list[list[tuple[bool, list[bool]]]]:
    """(exact, each answer token right) per query of each document, from greedy predictions: the
    prediction at position p - 1 is the token at p. With the answer's earlier tokens given (teacher
    forcing), every answer token right is exactly what greedy decoding would write."""
    out = []
    for d, p in zip(docs, preds):
        row = []
        for q in d["queries"]:
            ok = p[q["span"] - 1] == d["tokens"][q["span"]]
            row.append((bool(ok.all()), ok.tolist()))
        out.append(row)
    return out


@torch.no_grad()
def knn_memory_predictions(model, docs: list, settings: KNNSettings, meta: dict, tokenizer, device) -> list:
    """The persistent kNN memory (knn.KNNMemory, untrained) as a long-range memory: for every window that
    predicts an answer token, a memory built from the document's earlier windows (all of them: the store is
    as large as the document) is attached and the window is read; elsewhere predictions are -1."""
    T = model.config.block_size
    preds = []
    for d in tqdm(docs, desc="knn memory", disable=None, leave=False):
        tokens = d["tokens"]
        p = np.full(len(tokens) - 1, -1)
        for w in sorted({int(s - 1) // T for q in d["queries"] for s in q["span"]}):
            KNNMemory.detach(model)
            mem = KNNMemory.create(model, settings, meta, tokenizer)
            if w > 0:
                mem.add_tokens(model, tokens[:w * T].tolist(), source="earlier windows")
                mem.attach(model)
            x = torch.from_numpy(tokens[w * T:min((w + 1) * T, len(tokens) - 1)])[None].to(device)
            logits, _ = model(x, x)
            p[w * T:w * T + x.size(1)] = logits[0].argmax(-1).cpu().numpy()
            KNNMemory.detach(model)
        preds.append(p)
    return preds


def knnlm_predictions(docs: list, hs: list, logits: list, lam: float, k: int, temperature: float,
                      window: int | None = None) -> list:
    """kNN-LM over the document's own past: at each answer position, p = lam p_kNN + (1 - lam) p_LM, p_kNN
    over the k nearest of the (key, next token) pairs of the document's earlier windows (window: their
    length; None: of every earlier position whose next token is already read). Keys: the last block's MLP
    input as the model computed it window by window; softmax of minus the squared distance / temperature.
    logits[i]: the model's at answer_positions(docs[i]). Predictions elsewhere are -1."""
    preds = []
    for d, h, lg in zip(docs, hs, logits):
        tokens = torch.from_numpy(d["tokens"])
        p = np.full(len(tokens) - 1, -1)
        for j, pos in enumerate(answer_positions(d)):
            lp = F.log_softmax(lg[j].float(), -1)
            n = pos if window is None else pos // window * window  # entries i < n: next token i + 1 <= pos is read
            if n > 0:
                dist = ((h[:n] - h[pos]) ** 2).sum(-1)
                top = dist.topk(min(k, n), largest=False)
                w = F.softmax(-top.values / temperature, -1)
                p_knn = torch.zeros(lp.size(-1)).scatter_add_(0, tokens[1:n + 1][top.indices], w)
                lp = knnlm_mix(lg[j], p_knn, lam)
            p[pos] = int(lp.argmax(-1))
        preds.append(p)
    return preds


def source_entry(ids, p, src_pos: int):
    """Per head, for one query: is the entry at src_pos among the retrieved ids (H, k), the attention weight
    p (H, k) it gets, and the slot weighted most (H,) (where it is not src_pos, sharper scores cannot make
    the source win)."""
    found = ids == src_pos  # (H, k)
    top = ids.gather(-1, p.float().argmax(-1, keepdim=True)).squeeze(-1)
    return found.any(-1), (p.float() * found).sum(-1), top


@torch.no_grad()
def memorizing_diagnostics(model, docs: list, batch_size: int, device) -> dict:
    """Does the memorizing layer retrieve what the answer copies? For every answer token whose source token
    (the same character of the stated value) lies in an earlier window, read the documents as in training
    and record, per head, whether the source entry is among the query's top-k, the attention weight it gets
    and whether it gets the most (source_entry); by nominal distance, with the gates sigmoid(gate_bias).
    Where the documents record every value they state (facts_long's val), also what the entry a head
    weights most is (entry_kind). Memory slots are document positions (the memory is emptied per document
    and must hold a whole one)."""
    layer = memorizing_layer(model)
    H = layer.n_head
    if max(len(d["tokens"]) for d in docs) > layer.size:
        raise ConfigError(f"diagnostics need a memory holding whole documents: knn_memory_size {layer.size} < "
                          f"{max(len(d['tokens']) for d in docs)} tokens")
    targets = {}  # (doc, position) -> (source position, distance bucket, query)
    stated = []  # per document: token position -> (entity, attribute) of the stated value there (char tokens)
    for i, d in enumerate(docs):
        stated.append({f["start"] + j: (f["entity"], f["attribute"])
                       for f in d["record"].get("facts", []) for j in range(len(f["value"]))})
        for q in d["queries"]:
            src_pos = q["source_start"] - q["answer_start"] + q["span"]  # char tokenizer: one token per character
            for s, sp in zip(q["span"], src_pos):
                targets[(i, int(s) - 1)] = (int(sp), q["windows"], q)
    stats = {}  # bucket -> counts (per head where arrays)
    state = {}

    def on_window(w, group):
        state["w"], state["group"] = w, group

    def probe(ids, p):
        w, group = state["w"], state["group"]
        for r, i in enumerate(group):
            for t in range(ids.size(1)):
                hit = targets.get((i, w + t))
                if hit is None or hit[0] >= w:  # not an answer position, or its source is in the local window
                    continue
                src_pos, bucket, q = hit
                g = torch.arange(r * H, (r + 1) * H)
                found, weight, top = source_entry(ids[g, t], p[g, t], src_pos)
                b = stats.setdefault(bucket, {"n": 0, "any": 0, "retrieved": np.zeros(H), "weight": np.zeros(H),
                                              "first": np.zeros(H), "top": {k: np.zeros(H) for k in ENTRY_KINDS}})
                b["n"] += 1
                b["any"] += bool(found.any())
                b["retrieved"] += found.numpy()
                b["weight"] += weight.numpy()
                b["first"] += (top == src_pos).numpy()
                if stated[i]:
                    for h, slot in enumerate(top.tolist()):
                        b["top"][entry_kind(slot, src_pos, stated[i], q["entity"], q["attribute"])][h] += 1

    layer.probe = probe
    try:
        windowed_pass(model, [d["tokens"] for d in docs], batch_size, device, on_window=on_window)
    finally:
        layer.probe = None
    out = {"gates": torch.sigmoid(layer.gate_bias).tolist(), "topk": layer.topk, "by_distance": []}
    for w, b in sorted(stats.items()):
        row = {"windows": w, "answer_tokens": b["n"], "retrieved_any_head": b["any"] / b["n"],
               **{f"{k}_per_head": (b[k] / b["n"]).tolist() for k in ("retrieved", "weight", "first")}}
        if any(stated):
            row["top_entry_per_head"] = {k: (v / b["n"]).tolist() for k, v in b["top"].items()}
        out["by_distance"].append(row)
    return out


ENTRY_KINDS = ("stated", "stated value, other place", "same person, other value", "same attribute, other person",
               "other")


def entry_kind(slot: int, src_pos: int, stated: dict, entity: str, attribute: str) -> str:
    """What the memory entry at slot is, for an answer token copying the stated value's token at src_pos:
    that token, another token of the same value, a token of another value of the same person, of another
    person's value of the same attribute (the distractors the template makes alike), or anything else.
    stated: position -> (entity, attribute) of every token of the document's stated values."""
    if slot == src_pos:
        return "stated"
    who = stated.get(slot)
    if who == (entity, attribute):
        return "stated value, other place"
    if who is not None and who[0] == entity:
        return "same person, other value"
    if who is not None and who[1] == attribute:
        return "same attribute, other person"
    return "other"


@torch.no_grad()
def mnm_diagnostics(model, docs: list, batch_size: int, device) -> dict:
    """Does the MNM block write what will be asked? For every query whose value was stated in an earlier
    window than its answer, the share of that window's write strength (per head) that went to writing the
    value's tokens (with mnm_shift: the pairs whose value is one of them), by nominal distance; `uniform` is
    the share an even spread over the window's writes would give; and `window_strength`, the mean total
    write strength per head of the windows holding a value and of the windows between a value's last token
    and its answer (each at most the write budget): a window overwrites the fast weights by about as much
    as it writes, so a value survives only if it is written stronger than what comes between; and
    `value_token_strength`, the mean strength per head that wrote each of a value's tokens, by its place in
    the value (a memory that spends its step on one of a key's digits recalls that digit only); and
    `value_key_cosine`, per head the mean cosine between the write keys of one value's tokens' pairs (near 1:
    the fast weights cannot tell the pairs apart, so they hold one of the associations); and `reads`, by
    place in the value, for values wholly in one earlier window whose answer is read in one window: per
    head the cosine between the read key that predicts the answer token and the write key of the pair that
    wrote it (`key_cosine`), how many of the value window's write keys are nearer to that read key
    (`key_rank`, 0: the nearest), and the cosine between the value written and what the fast weights give,
    at the answer, under that write key (`stored_cosine`: is it kept?) and under the read key
    (`read_cosine`: is it read?). Char tokenizer: offsets are positions."""
    block = mnm_block(model)
    mnm, T = block.mnm, model.config.block_size
    if mnm.pool:
        raise ConfigError("write diagnostics are per token; this MNM block makes one pooled write per window")
    sources = {}  # (doc, window start) -> [(value positions in the window, distance bucket)]
    between = set()  # (doc, window start) of the windows between a value's and its answer's
    answers = {}  # (doc, answer window start) -> [(query, answer positions in the window)], values in one earlier window
    values = {}  # (doc, value window start) -> [(query, value positions in the window)], for those answers
    for i, d in enumerate(docs):
        for j, q in enumerate(d["queries"]):
            src = q["source_start"] - q["answer_start"] + q["span"]  # one token per character
            pos = q["span"] - 1  # the positions that predict the answer
            if src[0] // T < pos[0] // T:
                sources.setdefault((i, int(src[0]) // T * T), []).append((src - src[0] // T * T, q["windows"]))
                between.update((i, w * T) for w in range(int(src[-1]) // T + 1, int(pos[0]) // T))
            if src[0] // T == src[-1] // T < pos[0] // T == pos[-1] // T:
                answers.setdefault((i, int(pos[0]) // T * T), []).append((j, pos - pos[0] // T * T))
                values.setdefault((i, int(src[0]) // T * T), []).append((j, src - src[0] // T * T))
    stats = {}  # bucket -> [queries, share per head (H,), uniform]
    totals = {"value": [0, np.zeros(mnm.H)], "between": [0, np.zeros(mnm.H)]}  # [windows, summed totals (H,)]
    by_place = {}  # place in the value -> [tokens, summed strengths (H,)]
    key_cos = [0, np.zeros(mnm.H)]  # [values of two or more pairs, summed mean cosines (H,)]
    written = {}  # (doc, query) -> (the value window's write keys (H, S, dk), its pairs' indices, their values)
    by_read = {}  # place -> [answer tokens, then (H,) sums of key cosine, key rank, stored cosine, read cosine]
    state = {}

    def on_window(w, group):
        state["w"], state["group"] = w, group

    def probe(beta, kw, kr, v, fast):
        strength = beta[..., 0]  # (B, H, S) per token; with shift per pair (key t, value t + 1), the block's
        # pair across the boundary (the previous window's last key, the first value; strength 0 at a document's start) last
        if mnm.shift:  # index t: the pair that writes token t's value
            strength, kw, v = strength.roll(1, -1), kw.roll(1, 2), v.roll(1, 2)
        total = strength.sum(-1).clamp(min=1e-12)  # (B, H)
        for r, i in enumerate(state["group"]):
            for j, pos in answers.get((i, state["w"]), []):  # read first: the state holds the earlier windows
                if (i, j) not in written:
                    continue
                keys, pairs, vals = written.pop((i, j))
                k, row = kr[r][:, pos], {name: t[r:r + 1] for name, t in fast.items()}  # (H, n, dk)
                f_read, _ = mnm.recall(row, k[None])
                f_stored, _ = mnm.recall(row, keys[:, pairs][None])
                cos = (k[:, :, None] * keys[:, None]).sum(-1)  # (H, n, S): the read key against every write key
                mine = cos.gather(2, torch.as_tensor(pairs).expand(k.size(0), -1)[..., None])  # (H, n, 1)
                rank = (cos > mine).sum(-1)  # (H, n)
                stats_r = (mine[..., 0], rank.float(), F.cosine_similarity(f_stored[0], vals, dim=-1),
                           F.cosine_similarity(f_read[0], vals, dim=-1))
                for place in range(len(pairs)):
                    c = by_read.setdefault(place, [0] + [np.zeros(mnm.H) for _ in stats_r])
                    c[0] += 1
                    for m, t in enumerate(stats_r):
                        c[m + 1] += t[:, place].cpu().numpy()
            for kind, windows in (("value", sources), ("between", between)):
                if (i, state["w"]) in windows:
                    totals[kind][0] += 1
                    totals[kind][1] += total[r].cpu().numpy()
            for pos, bucket in sources.get((i, state["w"]), []):
                pos = pos[pos < strength.size(-1)]
                b = stats.setdefault(bucket, [0, np.zeros(mnm.H), 0.0])
                b[0] += 1
                b[1] += (strength[r][:, pos].sum(-1) / total[r]).cpu().numpy()
                b[2] += len(pos) / max(1, int((strength[r] > 0).any(0).sum()))
                if len(pos) > 1:  # the pairs writing the value's tokens (key of the token before)
                    k = kw[r][:, pos]  # (H, n, dk)
                    cos = k @ k.transpose(-1, -2)  # (H, n, n)
                    n = len(pos)
                    key_cos[0] += 1
                    key_cos[1] += ((cos.sum((-1, -2)) - n) / (n * n - n)).cpu().numpy()
                for j, p in enumerate(pos.tolist()):  # pos runs from the value's first token, in order
                    c = by_place.setdefault(j, [0, np.zeros(mnm.H)])
                    c[0] += 1
                    c[1] += strength[r][:, p].cpu().numpy()
            for j, pos in values.get((i, state["w"]), []):  # what the value's window wrote, for its answer's read
                written[(i, j)] = (kw[r], pos, v[r][:, pos])

    mnm.probe = probe
    try:
        windowed_pass(model, [d["tokens"] for d in docs], batch_size, device, on_window=on_window)
    finally:
        mnm.probe = None
    return {"shift": mnm.shift, "by_distance": [{"windows": w, "queries": b[0], "value_share_per_head": (b[1] / b[0]).tolist(),
                                                 "uniform": b[2] / b[0]} for w, b in sorted(stats.items())],
            "window_strength": {k: {"windows": n, "per_head": (t / max(1, n)).tolist()} for k, (n, t) in totals.items()},
            "value_token_strength": [{"place": j + 1, "tokens": n, "per_head": (t / n).tolist()}
                                     for j, (n, t) in sorted(by_place.items())],
            "value_key_cosine": (key_cos[1] / max(1, key_cos[0])).tolist(),
            "reads": [{"place": j + 1, "tokens": c[0], **{name: (t / c[0]).tolist() for name, t in zip(
                ("key_cosine", "key_rank", "stored_cosine", "read_cosine"), c[1:])}} for j, c in sorted(by_read.items())]}


def memory_kind(model) -> str:
    mems = row_memories(model)
    if "knn_memory" in mems:
        layer = mems["knn_memory"]
        at = f", entries {layer.distance} tokens back" if layer.distance else ""
        return f"memorizing layer {model.memory_args['knn_layer']}, topk {layer.topk}{at}"
    if "mnm_memory" in mems:
        return f"MNM block {model.memory_args['mnm_layer']}"
    return "no memory"


def eval_longrange(cfg, device) -> tuple[dict, object]:
    """Accuracy of recalling answers by distance (eval_dataset's val documents, longrange_val.jsonl): every
    checkpoint of out_dirs read window after window as in training, and, untrained, the persistent kNN memory
    filled with the document's earlier windows and kNN-LM over the document's own past, on longrange_base's
    model. All arms answer the same queries of the same documents, greedily (no sampling, so no seeds)."""
    models = {}
    for out_dir in cfg.out_dirs:
        model, tokenizer, meta, source = load_model("resume", out_dir, device)
        if isinstance(model, Seq2Seq):
            raise ConfigError(f"{out_dir} holds a seq2seq chatbot; eval='longrange' reads GPT checkpoints")
        layer = memorizing_layer(model)
        if cfg.eval_knn_topk and layer is not None:
            layer.topk = cfg.eval_knn_topk
        if cfg.eval_knn_distance is not None and layer is not None:
            why = MemorizingMemory.distance_conflict(cfg.eval_knn_distance, model.config.pos)
            if why:
                raise ConfigError(f"{out_dir}: {why} (leave eval_knn_distance None)")
            layer.distance = cfg.eval_knn_distance
        models[out_dir] = (model, tokenizer, meta)
    first_meta = next(iter(models.values()))[2]
    path = eval_dataset_dir(cfg, first_meta)
    for out_dir, (_, _, meta) in models.items():
        check_meta_compatible(meta, load_meta(path))
    tokenizer = next(iter(models.values()))[1]
    docs = longrange_documents(path, "val", tokenizer, cfg.eval_items)
    gen_path = os.path.join(path, "generator.json")
    generator = json.loads(open(gen_path).read()) if os.path.isfile(gen_path) else {}
    arms = []

    def add(name, kind, source, preds, seconds):
        arms.append({"name": name, "kind": kind, "source": source, "scores": score_queries(docs, preds),
                     "seconds": round(seconds, 1)})
        print(f"{name}: {seconds:.0f} s")

    tokens = [d["tokens"] for d in docs]
    if "checkpoints" in cfg.longrange_arms:
        for out_dir, (model, _, _) in models.items():
            t0 = time.perf_counter()
            kind = memory_kind(model)
            name = f"{os.path.basename(os.path.normpath(out_dir))} ({kind}, context {model.config.block_size})"
            add(name, kind, out_dir, windowed_pass(model, tokens, cfg.batch_size, device), time.perf_counter() - t0)
            if memorizing_layer(model) is not None and getattr(tokenizer, "name", None) == "char":
                arms[-1]["retrieval"] = memorizing_diagnostics(model, docs, cfg.batch_size, device)
            block = mnm_block(model)
            if block is not None and not block.mnm.pool and getattr(tokenizer, "name", None) == "char":
                arms[-1]["writes"] = mnm_diagnostics(model, docs, cfg.batch_size, device)
    base = cfg.longrange_base or next((o for o, (m, _, _) in models.items() if not row_memories(m)), None)
    untrained = [a for a in ("knn", "knnlm") if a in cfg.longrange_arms]
    if untrained and base is None:
        raise ConfigError("the kNN memory and kNN-LM arms need a model without a trainable memory: add one to "
                          "out_dirs or set longrange_base (or drop them from longrange_arms)")
    if untrained and base not in models:
        model, tok_b, meta_b, _ = load_model("resume", base, device)
        check_meta_compatible(meta_b, load_meta(path))
        models[base] = (model, tok_b, meta_b)
    base_name = os.path.basename(os.path.normpath(base)) if base else None
    if "knn" in cfg.longrange_arms:
        settings = KNNSettings.from_config(cfg)
        if settings.layers:
            t0 = time.perf_counter()
            model, tok_b, meta_b = models[base]
            preds = knn_memory_predictions(model, docs, settings, meta_b, tok_b, device)
            add(f"kNN memory of earlier windows, knn={settings.knn} ({base_name})", "knn memory", base, preds,
                time.perf_counter() - t0)
        else:
            print("skipping the kNN memory arm: set knn (one k per layer) to run it")
    if "knnlm" in cfg.longrange_arms:
        t0 = time.perf_counter()
        model = models[base][0]
        _, hs, logits = windowed_pass(model, tokens, cfg.batch_size, device, keep=[answer_positions(d) for d in docs])
        seconds = time.perf_counter() - t0
        for lam in [l for l in cfg.knnlm_lambdas if l > 0]:
            t0 = time.perf_counter()
            preds = knnlm_predictions(docs, hs, logits, lam, cfg.knnlm_k, cfg.knnlm_temperature, model.config.block_size)
            add(f"kNN-LM over the document's earlier windows, lambda {lam} ({base_name})", "knnlm", base, preds,
                seconds + time.perf_counter() - t0)
    return longrange_report(cfg, docs, arms, generator)


def longrange_report(cfg, docs: list, arms: list, generator: dict) -> tuple[dict, object]:
    """Accuracy by nominal distance (in windows of the generator's block_size) per arm: a table, the
    result dict and a plot of exact accuracy against distance, one line per arm."""
    distances = sorted({q["windows"] for d in docs for q in d["queries"]})
    T = generator.get("block_size")
    rows = []
    for arm in arms:
        by, where = {}, {"same window": [0, 0], "earlier window": [0, 0], "split across windows": [0, 0]}
        places = {}  # place in the answer -> [answers wholly in an earlier window this long, that token right]
        for d, scores in zip(docs, arm["scores"]):
            for q, (exact, right) in zip(d["queries"], scores):
                b = by.setdefault(q["windows"], [0, 0, 0.0])
                b[0] += 1
                b[1] += exact
                b[2] += float(np.mean(right))
                if T:  # the value stated in the window the answer is predicted in (a model without memory can copy
                    # it), in an earlier one (only a memory can), or across a window boundary (part of it in memory,
                    # the rest in the next window); the generator's windows, in characters
                    first, last = q["source_start"] // T, (q["source_start"] + len(q["answer"]) - 1) // T
                    kind = ("same window" if first == (q["answer_start"] - 1) // T else
                            "split across windows" if last > first else "earlier window")
                    where[kind][0] += 1
                    where[kind][1] += exact
                    for j, ok in enumerate(right if kind == "earlier window" else []):
                        c = places.setdefault(j, [0, 0])
                        c[0] += 1
                        c[1] += ok
        n_all = sum(b[0] for b in by.values())
        if "retrieval" in arm:
            diag = arm["retrieval"]
            print(f"{arm['name']}: gates {', '.join(f'{g:.3f}' for g in diag['gates'])}; source token retrieved "
                  "(any head, top-{}): ".format(diag["topk"])
                  + ", ".join(f"{b['windows']:g}w {b['retrieved_any_head']:.0%}" for b in diag["by_distance"]))
            if diag["by_distance"] and "top_entry_per_head" in diag["by_distance"][0]:
                # the reading head: with the joint mix a gate is a prior on the memory, not the share a head reads
                h = int(np.argmax(np.sum([b["top_entry_per_head"]["stated"] for b in diag["by_distance"]], 0)))
                print(f"{arm['name']}: the entry head {h} (most often the stated one) weights most: " + "; ".join(
                    f"{b['windows']:g}w " + ", ".join(f"{k} {v[h]:.0%}" for k, v in b["top_entry_per_head"].items())
                    for b in diag["by_distance"]))
        if "writes" in arm:
            print(f"{arm['name']}: share of the write strength on the value's tokens (mean of heads; even spread): "
                  + ", ".join(f"{b['windows']:g}w {np.mean(b['value_share_per_head']):.1%} ({b['uniform']:.1%})"
                              for b in arm["writes"]["by_distance"]))
            ws = arm["writes"]["window_strength"]
            print(f"{arm['name']}: total write strength per window (mean of heads): windows with a value "
                  f"{np.mean(ws['value']['per_head']):.3f}, windows between {np.mean(ws['between']['per_head']):.3f}")
            print(f"{arm['name']}: strength writing each of a value's tokens (largest head): "
                  + ", ".join(f"#{c['place']} {max(c['per_head']):.3f}" for c in arm["writes"]["value_token_strength"])
                  + "; cosine between its pairs' write keys (per head): "
                  + ", ".join(f"{c:.2f}" for c in arm["writes"]["value_key_cosine"]))
            for name, what in (("key_cosine", "cosine, read key : its pair's write key"),
                               ("key_rank", "write keys nearer the read key than its pair's"),
                               ("stored_cosine", "value : fast weights under the write key"),
                               ("read_cosine", "value : fast weights under the read key")):
                print(f"{arm['name']}: {what}, by place (per head): " + "; ".join(
                    f"#{c['place']} " + " ".join(f"{x:.2f}" if name != "key_rank" else f"{x:.1f}" for x in c[name])
                    for c in arm["writes"]["reads"]))
        if places:  # a memory that keeps part of a value shows here first: its exact recall is the product
            print(f"{arm['name']}: answer tokens right, values wholly in an earlier window: "
                  + ", ".join(f"#{j + 1} {r / n:.1%}" for j, (n, r) in sorted(places.items())))
        rows.append({"arm": arm["name"], "kind": arm["kind"], "source": arm["source"], "seconds": arm["seconds"],
                     **{k: arm[k] for k in ("retrieval", "writes") if k in arm},
                     "exact": sum(b[1] for b in by.values()) / n_all,
                     "by_distance": [{"windows": w, "queries": by[w][0], "exact": by[w][1] / by[w][0],
                                      "token_accuracy": by[w][2] / by[w][0]} for w in distances],
                     "by_window": {k: {"queries": n, "exact": e / n} for k, (n, e) in where.items() if n},
                     "earlier_window_by_place": [{"place": j + 1, "answers": n, "right": r / n}
                                                 for j, (n, r) in sorted(places.items())]})
    width = max(len(r["arm"]) for r in rows)
    print(f"\nexact recall by distance (windows of {generator.get('block_size', '?')} tokens), "
          f"{len(docs)} documents, {sum(len(d['queries']) for d in docs)} queries")
    print(f"{'arm':<{width}} | " + " | ".join(f"{w:>6g}" for w in distances)
          + " | same window | earlier windows | split across windows")
    for r in rows:
        split = [f"{r['by_window'][k]['exact']:6.1%} of {r['by_window'][k]['queries']}" if k in r["by_window"] else "-"
                 for k in ("same window", "earlier window", "split across windows")]
        print(f"{r['arm']:<{width}} | " + " | ".join(f"{b['exact']:6.1%}" for b in r["by_distance"])
              + f" | {split[0]:>11} | {split[1]:>15} | {split[2]:>20}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.plot([b["windows"] for b in r["by_distance"]], [b["exact"] for b in r["by_distance"]], "o-", label=r["arm"])
    if distances and min(distances) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(distances)
    ax.set_xticklabels([f"{w:g}" for w in distances])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"distance from the stated value to the answer (windows of {generator.get('block_size', '?')} tokens)")
    ax.set_ylabel("exact recall")
    ax.set_title(f"{cfg.eval_dataset} ({generator.get('task', '?')}): {len(docs)} held-out documents")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    result = {"rows": rows, "documents": len(docs), "queries": sum(len(d["queries"]) for d in docs),
              "distances": distances, "generator": generator,
              "per_document": {r["arm"]: [[int(e) for e, _ in s] for s in a["scores"]] for r, a in zip(rows, arms)}}
    return result, fig


def main(cfg: EvalConfig) -> dict:
    """Run the evaluation cfg.eval asks for; returns its result (also written as JSON and PNG)."""
    cfg.validate()  # load_config ran it already; an EvalConfig built in code gets it here
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    print(f"settings:\n{format_config(cfg)}")
    if cfg.eval == "longrange":  # loads its models itself: every checkpoint of out_dirs
        return write_eval(cfg, ", ".join(cfg.out_dirs), *eval_longrange(cfg, device))
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
