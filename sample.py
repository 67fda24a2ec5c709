"""
Sample from a trained model (a train.py checkpoint) or from GPT-2 weights, optionally with a
persistent kNN attention memory, and evaluate what the memory does.

    python sample.py --out_dir=out-facts --start=$'Imogen Hale lives in Oslo.\nQ: Where does Imogen Hale live?\nA:' --num_samples=3
    python sample.py config/sample_gpt2.py --init_from=path/to/hf_folder --start=FILE:prompt.txt
    python sample.py config/sample_gpt2_type_3_method.py                      # sentiment direction
    python sample.py config/sample_facts_recall.py                            # eval='recall'

Sample i is drawn with its own generator seeded seed + i, whatever batch it runs in, so
`--seed=S --num_samples=1` reproduces the sample printed with seed S on its own.

Memory settings (see memory.KNNSettings): `knn` (one k per layer), the gates and mixing of the
method's Types 1-3, the search backend; `memory_text` builds a memory (a string or FILE:path),
`memory_dir` loads one, `memory_save` writes it (load + text + save grows a memory).
"""

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from configurator import ConfigError, format_config, load_config
from memory import (KNNLM, KNNLMDatastore, KNNMemory, KNNMemoryError, KNNSettings, knn_probs, knnlm_mix,
                    last_mlp_input, memorizing_layer)
from model import GPT, CheckpointError, load_checkpoint, model_from_checkpoint
from prepare import DataError, check_meta_compatible, get_tokenizer, load_doc_starts, load_meta, open_split
from train import autocast_context, resolve_device


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


def write_json(path: str, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_figure(fig, path: str):
    import matplotlib.pyplot as plt
    tmp = path + ".tmp.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["lambda"] for r in rows], [r["ppl"] for r in rows], "o-")
    ax.set_xlabel("lambda (weight of p_kNN)")
    ax.set_ylabel("val perplexity")
    ax.set_title(f"kNN-LM, {len(store):,} entries, k={cfg.knnlm_k}, {n:,} tokens")
    ax.grid(alpha=0.3)
    return {"rows": rows, "tokens": n, "datastore": len(store), "backend": store.backend, "speed": speed}, fig


def main(cfg: SampleConfig):
    """Plain sampling returns [{'seed', 'text', 'completion', 'tokens'}]; eval=... returns the
    evaluation's results (also written as JSON and a PNG to eval_out)."""
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    if cfg.eval not in (None, "recall", "sentiment", "ppl", "knnlm"):
        raise ConfigError(f"eval={cfg.eval!r}; choose 'recall', 'sentiment', 'ppl' or 'knnlm' (or leave it None)")
    print(f"settings:\n{format_config(cfg)}")
    model, tokenizer, meta, source = load_model(cfg.init_from, cfg.out_dir, device)
    memory = setup_memory(cfg, model, tokenizer, meta)
    if cfg.compile:
        model = torch.compile(model)
    gen_kwargs = dict(stop_token=encode_stop(tokenizer, cfg.stop), device=device, dtype=dtype)
    if cfg.knnlm_lambda > 0 and cfg.eval is None:  # sample from lambda p_kNN + (1 - lambda) p_LM
        KNNLM(knnlm_datastore(cfg, model, meta), cfg.knnlm_lambda, cfg.knnlm_k, cfg.knnlm_temperature).attach(model)

    if cfg.eval:
        evaluate = {"recall": eval_recall, "sentiment": eval_sentiment, "ppl": eval_ppl, "knnlm": eval_knnlm}[cfg.eval]
        result, fig = evaluate(cfg, model, tokenizer, meta, memory, gen_kwargs)
        out = cfg.eval_out or os.path.join(cfg.out_dir, f"eval_{cfg.eval}")
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, f"{cfg.eval}.json"), {"settings": asdict(cfg), "model": source, **result})
        save_figure(fig, os.path.join(out, f"{cfg.eval}.png"))
        print(f"wrote {out}/{cfg.eval}.json and {cfg.eval}.png")
        return result

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
    except (ConfigError, DataError, CheckpointError, KNNMemoryError) as e:
        sys.exit(f"error: {e}")
