"""
Sample from a trained model (a train.py checkpoint) or from GPT-2 weights, optionally with a
persistent kNN attention memory, and evaluate what the memory does.

    python sample.py --out_dir=out-facts --start=$'Imogen Hale lives in Oslo.\nQ: Where does Imogen Hale live?\nA:' --num_samples=3
    python sample.py config/sample_gpt2.py --init_from=path/to/hf_folder --start=FILE:prompt.txt
    python sample.py config/sample_gpt2_type_3_method.py                      # sentiment direction
    python sample.py config/sample_facts_recall.py                            # eval='recall'
    python sample.py --out_dir=out-dialogs --mode=chat                        # chat with the seq2seq bot
    python sample.py config/eval_dialogs.py                                   # eval='dialog'

Sample i is drawn with its own generator seeded seed + i, whatever batch it runs in, so
`--seed=S --num_samples=1` reproduces the sample printed with seed S on its own.

Memory settings (see memory.KNNSettings): `knn` (one k per layer), the gates and mixing of the
method's Types 1-3, the search backend; `memory_text` builds a memory (a string or FILE:path),
`memory_dir` loads one, `memory_save` writes it (load + text + save grows a memory).
"""

import copy
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from configurator import ConfigError, format_config, load_config
from memory import (KNNLM, KNNLMDatastore, KNNMemory, KNNMemoryError, KNNSettings, knn_probs, knnlm_mix,
                    last_mlp_input, load_conversation, memorizing_layer, save_conversation)
from model import GPT, CheckpointError, Seq2Seq, load_checkpoint, model_from_checkpoint
from prepare import (DataError, WordVocab, check_meta_compatible, get_tokenizer, load_doc_starts, load_meta,
                     open_split)
from train import autocast_context, grow_vocab, prune_vocab, pyplot, resolve_device, save_figure, write_json


@dataclass
class SampleConfig(KNNSettings):
    init_from: str = "resume"  # 'resume' (out_dir/ckpt.pt), 'gpt2*', or a local HF GPT-2 folder
    out_dir: str = "out"
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 5
    max_new_tokens: int = 200  # with eval='recall': the M tokens in which an answer must appear
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 200
    top_p: float | None = None
    stop: str | None = None  # end a sample at this token, e.g. '<|endoftext|>' or '\n' (must be one token)
    seed: int = 1337
    batch_size: int = 8  # samples generated side by side
    use_cache: bool = True  # KV cache; False recomputes the context every token
    output_json: str | None = None  # also write every sample with its seed and these settings
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    # the kNN memory (active when knn has a k > 0)
    memory_text: str | None = None  # text to add to the memory, or FILE:path
    memory_dir: str | None = None  # load this memory folder first
    memory_save: str | None = None  # write the memory to this folder
    memory_force: bool = False  # use a memory built by other weights anyway
    # evaluation instead of plain sampling
    eval: str | None = None  # 'recall' or 'sentiment'
    eval_file: str | None = None  # recall: JSONL of {"memory", "prompt", "answers"}
    eval_items: int | None = None  # recall: only the first N items
    eval_seeds: int = 20  # seeds per item (recall) or per arm (sentiment): seed, seed + 1, ...
    eval_out: str | None = None  # folder for the JSON and the plot; default out_dir/eval_<eval>
    # perplexity of long documents (eval='ppl': a memorizing layer at memory sizes; eval='knnlm': kNN-LM)
    eval_dataset: str | None = None  # a dataset prepared with document boundaries in data_dir: its val split is scored
    data_dir: str = "data"
    eval_memory_sizes: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536])  # ppl: entries per row, head
    eval_context: bool = False  # ppl: read train document i (unscored) before val document i (shakespeare_plays:
    # the beginning of the same play)
    eval_baseline: str | None = None  # ppl: out_dir of a model trained without the layer, scored on the same text
    eval_tokens: int | None = None  # knnlm: score only the first N val tokens
    # kNN-LM: p = lambda p_kNN + (1 - lambda) p_LM over a datastore of (last block's MLP input, next token); the
    # search backend is knn_backend (+ knn_nlist, knn_nprobe) from the memory settings above
    knnlm_dir: str | None = None  # datastore folder: loaded, or built from eval_dataset's train split and saved here
    knnlm_max_tokens: int | None = None  # build from the first N train tokens only
    knnlm_lambda: float = 0.0  # sampling with the datastore; 0 = off
    knnlm_lambdas: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])  # eval='knnlm'
    knnlm_k: int = 64  # neighbours
    knnlm_temperature: float = 1.0  # p_kNN = softmax(-squared distance / temperature)
    # seq2seq chatbot (a checkpoint of train.py task='dialog'); eval='dialog' reads eval_file
    # (default data/dialogs/dialogs_test.jsonl), batch_size dialogues at a time
    mode: str = "sample"  # 'sample' or 'chat'
    chat_script: str | None = None  # replay these user lines (one per line; /save, /load, /reset, /quit work)
    chat_load: str | None = None  # start from this saved conversation (PATH.safetensors + PATH.json)
    chat_save: str | None = None  # save the conversation here at the end
    vocab_capacity: int | None = None  # at most this many words: those added while chatting go LRU first


def read_text(value: str) -> str:
    """A setting that holds text or FILE:path."""
    if value.startswith("FILE:"):
        path = value[len("FILE:"):]
        if not os.path.isfile(path):
            raise ConfigError(f"file {path} not found ({value!r})")
        with open(path, encoding="utf-8") as f:
            return f.read()
    return value


def load_model(init_from: str, out_dir: str, device: str):
    """(model in eval mode, tokenizer, tokenizer meta, where it came from)."""
    if init_from == "resume":
        path = os.path.join(out_dir, "ckpt.pt")
        ckpt = load_checkpoint(path, map_location=device)
        model = model_from_checkpoint(ckpt, dropout=0.0)
        meta, source = ckpt["meta"], path
        if ckpt.get("vocab"):  # the elastic vocabulary as training left it
            model.eval().to(device)
            return model, WordVocab.from_dict(ckpt["vocab"]), meta, source
    else:
        model = GPT.from_pretrained(init_from)
        meta, source = {"tokenizer": "gpt2"}, init_from
    model.eval().to(device)
    return model, get_tokenizer(meta), meta, source


def encode_stop(tokenizer, stop: str | None) -> int | None:
    if stop is None:
        return None
    ids = tokenizer.encode(stop)
    if len(ids) != 1:
        raise ConfigError(f"stop={stop!r} is {len(ids)} tokens for this tokenizer; it must be exactly one")
    return ids[0]


def setup_memory(cfg: SampleConfig, model, tokenizer, meta) -> KNNMemory | None:
    """Load, grow and save the kNN memory as the settings say, and attach it. None when off."""
    settings = KNNSettings.from_config(cfg)
    if not settings.layers:
        if cfg.memory_text or cfg.memory_dir or cfg.memory_save:
            raise ConfigError("memory_text/memory_dir/memory_save need a memory: set knn, one k per layer")
        return None
    if cfg.memory_dir and (os.path.isdir(cfg.memory_dir) or os.path.isdir(cfg.memory_dir + ".old")):
        memory = KNNMemory.load(cfg.memory_dir, model, settings, force=cfg.memory_force)
        print(f"loaded memory {cfg.memory_dir}: {len(memory):,} entries from {len(memory.documents)} document(s)")
    elif cfg.memory_dir:
        raise ConfigError(f"memory_dir {cfg.memory_dir} does not exist: build it with memory_text=... memory_save=...")
    else:
        memory = KNNMemory.create(model, settings, meta, tokenizer)
    if cfg.memory_text:
        source = cfg.memory_text[len("FILE:"):] if cfg.memory_text.startswith("FILE:") else "memory_text"
        memory.add_text(model, tokenizer, read_text(cfg.memory_text), source=source)
        print(f"memory: {len(memory):,} entries at layers {memory.layers}")
    if cfg.memory_save:
        memory.save(cfg.memory_save)
        print(f"saved memory to {cfg.memory_save}")
    memory.attach(model)
    return memory


def generate(model, prompt_ids: list[int], seeds: list[int], cfg: SampleConfig, stop_token=None,
             device="cpu", dtype="float32") -> list[list[int]]:
    """The new tokens of one sample per seed, batch_size rows at a time, each row with its own
    generator (so a sample does not depend on its batch)."""
    ctx = autocast_context(device, dtype)
    out = []
    for first in range(0, len(seeds), cfg.batch_size):
        batch_seeds = seeds[first:first + cfg.batch_size]
        generators = [torch.Generator(device=device).manual_seed(s) for s in batch_seeds]
        x = torch.tensor([prompt_ids] * len(batch_seeds), dtype=torch.long, device=device)  # (B, T)
        with torch.no_grad(), ctx:
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                               top_p=cfg.top_p, stop_token=stop_token, generators=generators,
                               use_cache=cfg.use_cache)
        for row in y.tolist():
            new = row[len(prompt_ids):]
            if stop_token is not None and stop_token in new:
                new = new[:new.index(stop_token) + 1]
            out.append(new)
    return out


def write_eval(cfg, source: str, result: dict, fig) -> dict:
    """Write an evaluation's result (with the settings and the model) as JSON and its figure as PNG,
    to eval_out or out_dir/eval_<eval>; returns the result."""
    out = cfg.eval_out or os.path.join(cfg.out_dir, f"eval_{cfg.eval}")
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, f"{cfg.eval}.json"), {"settings": asdict(cfg), "model": source, **result})
    save_figure(fig, os.path.join(out, f"{cfg.eval}.png"))
    print(f"wrote {out}/{cfg.eval}.json and {cfg.eval}.png")
    return result


def contains_word(text: str, answer: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(answer) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


def eval_recall(cfg, model, tokenizer, meta, memory, gen_kwargs) -> dict:
    """Three arms per item, the same seeds in each: the question alone, the memory text placed
    in the context before it, and the question with the memory holding the text."""
    if not cfg.eval_file:
        raise ConfigError("eval='recall' needs eval_file: a JSONL of {\"memory\", \"prompt\", \"answers\"}")
    if memory is None:
        raise ConfigError("eval='recall' needs a memory: set knn, one k per layer")
    with open(cfg.eval_file) as f:
        items = [json.loads(line) for line in f if line.strip()]
    items = items[:cfg.eval_items] if cfg.eval_items else items
    seeds = [cfg.seed + i for i in range(cfg.eval_seeds)]
    bk = "\n"  # every prompt starts with the bookkeeping token, as the memory's windows do
    arms = ("none", "context", "memory")
    results = []
    from tqdm import tqdm
    for item in tqdm(items, desc="recall", disable=None):
        prompts = {"none": bk + item["prompt"], "context": bk + item["memory"] + "\n" + item["prompt"],
                   "memory": bk + item["prompt"]}
        row = {"prompt": item["prompt"], "answers": item["answers"], "memory": item["memory"]}
        for arm in arms:
            if arm == "memory":
                memory.clear()
                memory.add_text(model, tokenizer, item["memory"], source="eval item")
                memory.attach(model)
            else:
                KNNMemory.detach(model)
            texts = [tokenizer.decode(t) for t in generate(model, tokenizer.encode(prompts[arm]), seeds, cfg,
                                                          **gen_kwargs)]
            hits = [any(contains_word(t, a) for a in item["answers"]) for t in texts]
            row[arm] = sum(hits) / len(hits)
            row[f"{arm}_samples"] = texts
        results.append(row)
    summary = {arm: sum(r[arm] for r in results) / len(results) for arm in arms}
    for arm in arms:
        print(f"{arm:>8}: hit rate {summary[arm]:.3f} over {len(results)} items x {len(seeds)} seeds")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    n = len(results) * len(seeds)
    errs = [(summary[a] * (1 - summary[a]) / n) ** 0.5 for a in arms]
    ax.bar(["question only", "text in context", "kNN memory"], [summary[a] for a in arms], yerr=errs,
           color=["#999", "#69c", "#c63"], capsize=4)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"hit rate (answer in first {cfg.max_new_tokens} tokens)")
    ax.set_title(f"recall: {len(results)} items x {len(seeds)} seeds")
    return {"summary": summary, "seeds": seeds, "items": results}, fig


def eval_sentiment(cfg, model, tokenizer, meta, memory, gen_kwargs) -> dict:
    """VADER compound score of each continuation (prompt removed), plain vs memory, same seeds."""
    if memory is None:
        raise ConfigError("eval='sentiment' needs a memory: set knn and memory_text or memory_dir")
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    vader = SentimentIntensityAnalyzer()
    prompt_ids = tokenizer.encode(read_text(cfg.start))
    seeds = [cfg.seed + i for i in range(cfg.eval_seeds)]
    arms = {}
    for arm in ("plain", "memory"):
        if arm == "plain":
            KNNMemory.detach(model)
        else:
            memory.attach(model)
        texts = [tokenizer.decode(t) for t in generate(model, prompt_ids, seeds, cfg, **gen_kwargs)]
        scores = torch.tensor([vader.polarity_scores(t)["compound"] for t in texts])
        q1, med, q3 = torch.quantile(scores, torch.tensor([0.25, 0.5, 0.75])).tolist()
        arms[arm] = {"median": med, "iqr": q3 - q1, "mean": scores.mean().item(), "scores": scores.tolist(),
                     "samples": texts}
        print(f"{arm:>7}: median {med:+.3f}, IQR {q3 - q1:.3f}, mean {scores.mean().item():+.3f} "
              f"over {len(seeds)} seeds")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.boxplot([arms["plain"]["scores"], arms["memory"]["scores"]])
    ax.set_xticks([1, 2], ["no memory", "kNN memory"])
    ax.set_ylabel("VADER compound score of the continuation")
    ax.set_ylim(-1.05, 1.05)
    ax.set_title(f"sentiment: {len(seeds)} seeds, prompt {read_text(cfg.start)!r}"[:60])
    return {"arms": arms, "seeds": seeds}, fig


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
    from tqdm import tqdm
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


def eval_ppl(cfg, model, tokenizer, meta, memory, gen_kwargs):
    """Perplexity of eval_dataset's val documents: the model with its memorizing layer at every size in
    eval_memory_sizes and with the layer off, and eval_baseline's model, on the same tokens."""
    path = eval_dataset_dir(cfg, meta)
    device = gen_kwargs["device"]
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

    attn = model.attentions[model.config.knn_layer]
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


def knnlm_datastore(cfg, model, meta) -> KNNLMDatastore:
    """The datastore in knnlm_dir, built from eval_dataset's train split (and saved there) when it is not there."""
    settings = KNNSettings.from_config(cfg)
    settings.check(model.config.n_layer)  # the search backend's name
    if not cfg.knnlm_dir:
        raise ConfigError("kNN-LM needs knnlm_dir: a datastore folder (built there from eval_dataset's train split)")
    if os.path.isdir(cfg.knnlm_dir):
        store = KNNLMDatastore.load(cfg.knnlm_dir, model, settings, force=cfg.memory_force)
        print(f"loaded datastore {cfg.knnlm_dir}: {len(store):,} entries")
        return store
    path = eval_dataset_dir(cfg, meta)
    data = open_split(path, "train", load_meta(path))
    tokens = np.asarray(data[:cfg.knnlm_max_tokens], dtype=np.int64)
    store = KNNLMDatastore.create(model, settings, meta)
    store.add_tokens(model, torch.from_numpy(tokens), source=f"{path}/train.bin")
    store.save(cfg.knnlm_dir)
    print(f"built datastore {cfg.knnlm_dir}: {len(store):,} entries ({store.backend})")
    return store


@torch.no_grad()
def eval_knnlm(cfg, model, tokenizer, meta, memory, gen_kwargs):
    """Perplexity of eval_dataset's val split (first eval_tokens tokens, windows of block_size) with
    the plain model and with kNN-LM at every lambda in knnlm_lambdas."""
    store = knnlm_datastore(cfg, model, meta)
    path = eval_dataset_dir(cfg, meta)
    data = np.asarray(open_split(path, "val", load_meta(path))[:cfg.eval_tokens], dtype=np.int64)
    T = model.config.block_size
    lambdas = [0.0] + [l for l in cfg.knnlm_lambdas if l > 0]
    nll = {l: 0.0 for l in lambdas}
    n = 0
    import time
    seconds = {"plain": 0.0, "knnlm": 0.0}
    from tqdm import tqdm
    device = gen_kwargs["device"]
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


# -----------------------------------------------------------------------------
# dialogue with a seq2seq model: chat, and the evaluation on held-out dialogues

class Conversation:
    """Conversations with a Seq2Seq model, one per batch row, turn by turn. Holds the memory state
    (the fast weights, separate per row) and the elastic vocabulary: a word the user types that the
    vocabulary lacks is added, with a new embedding row by the model's init rule, so the bot can read
    it and say it back. persist=False starts every turn from the initial memory (the no-memory
    baseline). With capacity, words added while chatting are pruned least recently used first; the
    words the model was trained with are kept."""

    def __init__(self, model, vocab, batch_size=1, persist=True, capacity=None, seed=0, step=0):
        self.model, self.vocab, self.persist, self.capacity = model, vocab, persist, capacity
        self.trained_words = list(vocab.words)
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
        words = [WordVocab.tokenize(u)[-self.model.config.block_size:] if u is not None else [] for u in utterances]
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
                          {"step": self.step, "batch_size": self.batch_size, "trained_words": self.trained_words})

    def load(self, path):
        """Restore a saved conversation: memory, vocabulary and the embedding rows of its words."""
        device = self.model.transformer.wte.weight.device
        state, wte, vocab, extra = load_conversation(path, device)
        if wte.size(1) != self.model.config.n_embd or wte.size(0) != len(vocab["words"]):
            raise ConfigError(f"conversation {path} does not fit this model (embedding {tuple(wte.shape)})")
        if self.model.memory is not None:
            self.model.memory.check_state(state, extra["batch_size"])
        self.vocab = WordVocab.from_dict(vocab)
        self.model.transformer.wte.weight = self.model.lm_head.weight = nn.Parameter(wte)
        self.model.config.vocab_size = wte.size(0)
        self.state, self.step, self.batch_size = state, extra["step"], extra["batch_size"]
        self.trained_words = extra["trained_words"]


def read_dialogs(path, limit=None) -> list[dict]:
    if not os.path.isfile(path):
        raise ConfigError(f"no dialogue file {path}: run python prepare.py dialogs, or set eval_file")
    with open(path) as f:
        dialogs = [json.loads(line) for line in f if line.strip()]
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


def run_chat(cfg, model, vocab):
    """Chat turn by turn, from cfg.chat_script (a file of user lines) or the keyboard. Lines starting
    with / are commands: /save PATH, /load PATH, /reset, /quit. Returns the transcript."""
    conv = Conversation(model, vocab, capacity=cfg.vocab_capacity, seed=cfg.seed)
    if cfg.chat_load:
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
        with open(cfg.chat_script) as f:
            lines = f.read().splitlines()
    transcript = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        command, _, arg = line.partition(" ")
        if command == "/quit":
            break
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
            if cfg.chat_script:
                print(f"you: {line}")
            print(f"bot: {reply}")
            transcript.append({"user": line, "bot": reply})
    if cfg.chat_save:
        conv.save(cfg.chat_save)
        print(f"saved conversation {cfg.chat_save}")
    return transcript


def run_dialog(cfg, model, vocab, source):
    """What sample.py does with a seq2seq model: mode='chat', or eval='dialog'."""
    if cfg.eval == "dialog":
        test_file = cfg.eval_file or os.path.join("data", "dialogs", "dialogs_test.jsonl")
        return write_eval(cfg, source, *eval_dialog(cfg, model, vocab, test_file))
    if cfg.mode != "chat" or cfg.eval:
        raise ConfigError(f"{source} is a seq2seq chatbot: use mode='chat' or eval='dialog'")
    transcript = run_chat(cfg, model, vocab)
    if cfg.output_json:
        write_json(cfg.output_json, {"settings": asdict(cfg), "model": source, "transcript": transcript})
    return transcript


def main(cfg: SampleConfig):
    """Plain sampling returns [{'seed', 'text', 'completion', 'tokens'}]; eval=... returns the
    evaluation's results (also written as JSON and a PNG to eval_out)."""
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    if cfg.eval not in (None, "recall", "sentiment", "ppl", "knnlm", "dialog"):
        raise ConfigError(f"eval={cfg.eval!r}; choose 'recall', 'sentiment', 'ppl', 'knnlm' or 'dialog' "
                          "(or leave it None)")
    if cfg.mode not in ("sample", "chat"):
        raise ConfigError(f"mode={cfg.mode!r}; choose 'sample' or 'chat'")
    print(f"settings:\n{format_config(cfg)}")
    model, tokenizer, meta, source = load_model(cfg.init_from, cfg.out_dir, device)
    if isinstance(model, Seq2Seq):
        return run_dialog(cfg, model, tokenizer, source)
    if cfg.mode == "chat" or cfg.eval == "dialog":
        raise ConfigError(f"mode='chat' and eval='dialog' need a seq2seq chatbot (train.py task='dialog'); "
                          f"{source} is a GPT")
    memory = setup_memory(cfg, model, tokenizer, meta)
    if cfg.compile:
        model = torch.compile(model)
    gen_kwargs = dict(stop_token=encode_stop(tokenizer, cfg.stop), device=device, dtype=dtype)
    if cfg.knnlm_lambda > 0 and cfg.eval is None:  # sample from lambda p_kNN + (1 - lambda) p_LM
        KNNLM(knnlm_datastore(cfg, model, meta), cfg.knnlm_lambda, cfg.knnlm_k, cfg.knnlm_temperature).attach(model)

    if cfg.eval:
        evaluate = {"recall": eval_recall, "sentiment": eval_sentiment, "ppl": eval_ppl, "knnlm": eval_knnlm}[cfg.eval]
        return write_eval(cfg, source, *evaluate(cfg, model, tokenizer, meta, memory, gen_kwargs))

    prompt = read_text(cfg.start)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ConfigError("the prompt is empty: set start to some text (e.g. --start='\\n')")
    seeds = [cfg.seed + i for i in range(cfg.num_samples)]
    samples = []
    for seed, new in zip(seeds, generate(model, prompt_ids, seeds, cfg, **gen_kwargs)):
        completion = tokenizer.decode(new)
        samples.append({"seed": seed, "text": prompt + completion, "completion": completion, "tokens": new})
        print(f"--- sample {seed - cfg.seed} (seed {seed}) ---")
        print(prompt + completion)
    if cfg.output_json:
        write_json(cfg.output_json, {"settings": asdict(cfg), "model": source, "prompt": prompt, "samples": samples})
        print(f"wrote {len(samples)} samples to {cfg.output_json}")
    return samples


if __name__ == "__main__":
    try:
        main(load_config(SampleConfig))
    except (ConfigError, DataError, CheckpointError, KNNMemoryError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
