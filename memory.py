"""
Memories for transformers and their neighbours: the persistent kNN attention memory, which plugs
into the attention seam of model.py (`attn.memory`, see model.py's docstring); the differentiable
neural computer; and a replay buffer for continual learning.

Persistent kNN attention memory
-------------------------------
The "medium-term memory" method (../shared/docs/knn-memory.md): run a text through the model once,
keep the keys and values of every token at chosen layers, per head, and while generating let the
heads that attend strongly to a position replace that position's value by a mix of the values of
the memory entries nearest to its key. No parameter is trained.

    mem = KNNMemory.create(model, settings, tokenizer_meta, tokenizer)
    mem.add_text(model, tokenizer, "Cats are wonderful ...", source="cats.txt")   # grow
    mem.attach(model)            # generate as usual: model.generate(...)
    mem.save("memories/cats")    # a folder: manifest.json + kv.safetensors (+ faiss indexes)
    mem = KNNMemory.load("memories/cats", model, settings)

Every memory entry is one token of one document at every memory layer and head, so entry n is
the same token everywhere and one `doc_ids` vector says where each entry came from.

Differences from the reference, on purpose: the build pass is clean (no retrieval while building,
so a multi-layer memory is not contaminated); text of any length is streamed in windows that each
start with the bookkeeping token; the hook is batched and searches all heads of a layer at once;
with fewer than k entries the search returns all of them instead of padding with a sentinel row;
and a question-dependent variant (knn_query='query') searches with the newest token's query.

Memorizing Transformer layer and kNN-LM
---------------------------------------
MemorizingMemory (Wu et al., ICLR 2022) is a trained kNN-attention layer: GPTConfig.knn_layer = L
puts one at layer L's seam; each batch row keeps a FIFO of its past windows' keys and values per
head (train.py streams rows document by document and empties a row's memory at its document's
end). KNNLMDatastore (Khandelwal et al., ICLR 2020) keeps (last block's MLP input, next token)
pairs of a corpus in the memory-folder format; knnlm_log_probs mixes p_kNN into the model's
distribution. Both search with exact_search (or the faiss backends), the function TorchIndex uses.

    model = GPT(GPTConfig(..., knn_layer=4, knn_topk=32, knn_memory_size=16384))
    store = KNNLMDatastore.create(model, KNNSettings(knn_backend="faiss-ivf"), meta)
    store.add_tokens(model, train_tokens); store.save("datastore")
    KNNLM(store, lam=0.25, k=64, temperature=1.0).attach(model)   # model.generate samples from the mix

Differentiable neural computer (Graves et al., Nature 538:471, 2016)
--------------------------------------------------------------------
The equations are in ../shared/docs/dnc-and-replay.md; each step here follows them in order:
content addressing, usage and retention, allocation, write weighting, erase then add,
precedence and temporal links, then the reads (backward, content, forward modes) on the
memory after the write. Everything is batched and vectorised over heads and slots: the only
Python loop is over time, which the recurrence makes inherent.

    dnc = DNC(DNCConfig(input_size=9, output_size=8, memory_slots=32, word_size=16, read_heads=1))
    y, state = dnc(x)            # x (B, T, 9) -> y (B, T, 8); state: a dict of tensors
    y2, state = dnc(x2, state)   # carry the memory on to the next sequence
    save_dnc_state(state, "mem.pt"); state = load_dnc_state("mem.pt", dnc)

Metalearned neural memory (Munkhdalai et al. 2019; ../shared/docs/neural-memory.md)
---------------------------------------------------------------------------------
MNM: per head, a small MLP of fast weights written by a learned local rule, a gradient step, or a
Titans-style update (momentum plus a forgetting gate), read through the written weights. The
initial fast weights are learned; the state is one copy per batch row. model.Seq2Seq carries it from
turn to turn of a conversation; MNMBlock puts one after a GPT block, written segment by segment.

    mnm = MNM(n_embd=64, heads=4, key_size=16, hidden=32, write="local")
    reads, state, write_loss = mnm(h, mask, mnm.initial_state(B))
    save_conversation("chats/ada", state, embedding, vocab.to_dict())   # safetensors + JSON

Replay memory
-------------
ReplayBuffer keeps a fixed number of past training examples (ring buffer or reservoir) and
hands back random ones from its filled slots to mix into new batches.
"""

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from model import Block, GPTConfig, atomic_save, atomic_write

FORMAT_VERSION = 1
BACKENDS = ("auto", "torch", "faiss-flat", "faiss-ivf", "faiss-ivfpq")
# measured on 2 CPU cores, 12 heads of 64 (bench.py config/bench_knn.py): with one query per head faiss's
# flat scan beats a matmul + top-k from ~3k entries; with tens of queries per head the batched matmul wins
AUTO_FAISS_FROM = 3000


class KNNMemoryError(RuntimeError):
    """A memory folder that cannot be used as asked; the message says why and what to do."""


@dataclass
class KNNSettings:
    knn: list[int] = field(default_factory=list)  # neighbours per layer (one entry per layer), 0 = off; [] = no memory
    bookkeeping_frac: float = 0.9  # BF: position 0 is used only where the newest token's attention to it exceeds this
    mem_frac: float = 0.0  # MF: >0 also uses positions j with attention >= 1/(MF * T); 0: only position 0
    knn_softmax_influence: float = 1.0  # TS: sharpness of the mix over candidates (1000 ~ argmax, 0.01 ~ uniform)
    resid_only: bool = False  # True: the current value is not a candidate of the mix
    resid_frac: float = 0.0  # r: v' = (1 - r) * mix + r * v (0: v' = mix)
    remove_bookkeeping: int = 1  # leading positions of every build window (the bookkeeping token) kept out of memory
    knn_query: str = "key"  # 'key': search with the chosen position's key (reference); 'query': with the newest token's query
    knn_metric: str = "l2"  # 'l2' (reference) or 'ip' (inner product)
    knn_backend: str = "auto"  # exact: 'auto' (the faster of the two below), 'torch' (matmul + top-k), 'faiss-flat';
    # approximate: 'faiss-ivf', 'faiss-ivfpq'
    knn_recompute: bool = True  # True: the reference (the newest token re-chooses values every position reads;
    # decoding recomputes the layers from the first memory layer up); False: causal, each token applies the
    # memory to its own attention only, mixing with its own query, so the ordinary KV cache applies
    knn_nlist: int = 0  # IVF lists; 0: about 4 * sqrt(entries)
    knn_nprobe: int = 16  # IVF lists searched per query
    knn_pq_m: int = 8  # IVF-PQ sub-quantizers (must divide the head size)

    def check(self, n_layer: int):
        if self.knn and len(self.knn) != n_layer:
            raise KNNMemoryError(f"knn has {len(self.knn)} entries but the model has {n_layer} layers: "
                               f"give one k per layer, e.g. knn={[0] * (n_layer - 1) + [5]}")
        if any(k < 0 for k in self.knn):
            raise KNNMemoryError(f"knn entries must be >= 0, got {self.knn}")
        for name, value, allowed in (("knn_query", self.knn_query, ("key", "query")),
                                     ("knn_metric", self.knn_metric, ("l2", "ip")),
                                     ("knn_backend", self.knn_backend, BACKENDS)):
            if value not in allowed:
                raise KNNMemoryError(f"{name}={value!r}; choose one of {', '.join(allowed)}")

    @property
    def layers(self) -> list[int]:
        return [i for i, k in enumerate(self.knn) if k > 0]

    @classmethod
    def from_config(cls, cfg) -> "KNNSettings":
        """The KNNSettings part of a script's settings (which inherit from this class)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


def model_fingerprint(model) -> str:
    """A short hash of the model's shape and weights: a memory only makes sense with the model
    whose keys and values it holds. Samples ~256 values of every tensor, which is enough to tell
    two trainings apart and cheap for GPT-2-sized models."""
    h = hashlib.sha256()
    # knn_topk / knn_memory_size / knn_search_dtype change no weight, and models without a memorizing layer
    # keep their old hash
    shape = {k: v for k, v in asdict(model.config).items()
             if k not in ("dropout", "knn_topk", "knn_memory_size", "knn_search_dtype")
             and not (k == "knn_layer" and v < 0)}
    if shape.get("mnm_layer", -1) < 0:  # nor do GPTs without an MNM block (a seq2seq model's mnm_* shape its memory)
        drop = ("mnm_layer",) + (() if "model_type" in shape else MNM_SHAPE_KEYS)
        shape = {k: v for k, v in shape.items() if k not in drop}
    h.update(json.dumps(shape, sort_keys=True).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().flatten()
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# search backends: search(heads (M,), vecs (M, d), k) -> ids (M, k) into that head's entries

def exact_search(queries, keys, k: int, metric: str, sq_norms=None, n_valid=None):
    """Exact top-k: ids (G, M, k) of the keys (G, N, d) nearest each query (G, M, d) of its group,
    all groups in one batched matrix product. Groups are heads (TorchIndex) or (batch row, head)
    pairs (MemorizingMemory). n_valid (G,): only the first n_valid[g] keys of group g count."""
    G, M, N = queries.size(0), queries.size(1), keys.size(1)
    if metric == "l2" and sq_norms is None:
        sq_norms = (keys * keys).sum(-1)  # (G, N)
    # on CPU, groups at a time whose scores fit in cache: scoring and top-k then stream through it once
    # (about 1.6x faster than one bmm + topk over 32 x 128 x 16k scores); on GPU, all at once
    step = G if keys.is_cuda else max(1, (1 << 21) // max(1, M * N))
    out = []
    for g in range(0, G, step):
        q, kk = queries[g:g + step], keys[g:g + step]
        if metric == "l2":  # -||q - k||^2 up to the query's own norm, which does not change the ranking
            scores = torch.baddbmm(-sq_norms[g:g + step, None, :], q, kk.transpose(1, 2), alpha=2)
        else:
            scores = torch.bmm(q, kk.transpose(1, 2))  # (g, M, N)
        if n_valid is not None:
            empty = torch.arange(N, device=keys.device) >= n_valid[g:g + step, None]  # (g, N)
            scores = scores.masked_fill(empty[:, None, :], float("-inf"))
        out.append(scores.topk(k, dim=-1).indices)
    return out[0] if len(out) == 1 else torch.cat(out)


class TorchIndex:
    """Exact search by one batched matrix product over all heads plus top-k (CPU or CUDA)."""

    def __init__(self, keys, metric: str):
        self.keys = keys  # (H, N, d)
        self.metric = metric
        self.sq_norms = (keys * keys).sum(-1) if metric == "l2" else None  # (H, N)

    def search(self, heads, vecs, k):
        H = self.keys.size(0)
        # queries of each head side by side, padded to the busiest head: (H, Mmax, d)
        counts = torch.bincount(heads, minlength=H)
        order = torch.argsort(heads, stable=True)
        sorted_heads = heads[order]
        slot = torch.arange(len(heads), device=heads.device) - (torch.cumsum(counts, 0) - counts)[sorted_heads]
        padded = vecs.new_zeros(H, int(counts.max()), vecs.size(-1))
        padded[sorted_heads, slot] = vecs[order]
        ids = exact_search(padded, self.keys, k, self.metric, self.sq_norms)  # (H, Mmax, k)
        out = torch.empty(len(heads), k, dtype=torch.long, device=heads.device)
        out[order] = ids[sorted_heads, slot]
        return out


class FaissIndex:
    """One faiss index per head (faiss searches one database per call). Flat is exact; IVF and
    IVF-PQ trade exactness for speed on large memories. On CUDA with faiss-gpu the indexes live
    on the GPU."""

    def __init__(self, keys, metric: str, kind: str, nlist: int, nprobe: int, pq_m: int, indexes=None):
        import faiss
        # faiss's OpenMP pool and torch's would otherwise both spin up to all cores and fight
        faiss.omp_set_num_threads(torch.get_num_threads())
        self.faiss = faiss
        H, N, d = keys.shape
        self.device = keys.device
        if indexes is None:
            indexes = [self._build(keys[h].float().cpu().numpy(), metric, kind, nlist, pq_m) for h in range(H)]
        for index in indexes:
            if hasattr(index, "nprobe"):
                index.nprobe = nprobe
        if keys.is_cuda and hasattr(faiss, "StandardGpuResources"):
            self.res = faiss.StandardGpuResources()
            indexes = [faiss.index_cpu_to_gpu(self.res, keys.device.index or 0, ix) for ix in indexes]
        self.indexes = indexes

    def _build(self, x, metric, kind, nlist, pq_m):
        faiss = self.faiss
        N, d = x.shape
        mt = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if kind == "faiss-flat":
            index = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
        else:
            nlist = nlist or max(1, int(4 * math.sqrt(N)))
            if N < nlist:
                raise KNNMemoryError(f"{kind} with {nlist} lists needs at least that many entries, the memory has {N}: "
                                   "lower knn_nlist or use knn_backend='torch' for small memories")
            quantizer = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
            if kind == "faiss-ivf":
                index = faiss.IndexIVFFlat(quantizer, d, nlist, mt)
            else:
                if d % pq_m:
                    raise KNNMemoryError(f"knn_pq_m={pq_m} must divide the head size {d}")
                index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, 8, mt)
            # faiss's k-means wants ~39 points per centroid; train on a sample of the keys
            sample = x[torch.randperm(N, generator=torch.Generator().manual_seed(0))[: 64 * nlist].numpy()]
            index.train(sample)
            index.quantizer_trains_alone = 0
        index.add(x)
        return index

    def search(self, heads, vecs, k):
        out = torch.empty(len(heads), k, dtype=torch.long)
        heads_cpu, vecs_cpu = heads.cpu(), vecs.float().cpu().numpy()
        for h in torch.unique(heads_cpu).tolist():
            rows = (heads_cpu == h).nonzero().squeeze(1)
            _, ids = self.indexes[h].search(vecs_cpu[rows.numpy()], k)
            out[rows] = torch.from_numpy(ids).long()
        return out.to(heads.device)


# -----------------------------------------------------------------------------

class KNNMemory:
    """Keys and values of memory texts per (layer, head), their documents, and search indexes."""
    KIND = "knn-attention-memory"  # the manifest's kind; KNNLMDatastore keeps the same folder format

    def __init__(self, settings: KNNSettings, layers: list[int], n_head: int, head_size: int, fingerprint: str,
                 tokenizer: dict, bookkeeping_token: int, device="cpu", value_size: int | None = None):
        self.settings = settings
        self.value_size = value_size or head_size  # values are head vectors, or a datastore's next token (1)
        self.layers = list(layers)
        self.n_head, self.head_size = n_head, head_size
        self.fingerprint = fingerprint
        self.tokenizer = tokenizer  # the dataset meta of the model's tokenizer
        self.bookkeeping_token = bookkeeping_token
        self.remove_bookkeeping = settings.remove_bookkeeping
        self.device = torch.device(device)
        self.keys = {L: torch.zeros(n_head, 0, head_size, device=self.device) for L in self.layers}  # (H, N, d)
        self.values = {L: torch.zeros(n_head, 0, self.value_size, device=self.device) for L in self.layers}  # (H, N, dv)
        self.doc_ids = torch.zeros(0, dtype=torch.long, device=self.device)  # (N,)
        self.documents: list[dict] = []  # {"id", "source", "text", "n_tokens"}
        self._indexes: dict = {}  # layer -> index, built lazily after every change

    def __len__(self):
        return self.doc_ids.numel()

    @classmethod
    def create(cls, model, settings: KNNSettings, tokenizer_meta: dict, tokenizer):
        settings.check(model.config.n_layer)
        if not settings.layers:
            raise KNNMemoryError("knn selects no layer: set knn to one k per layer, e.g. knn=[0, 0, 5, 0]")
        bk = tokenizer.encode("\n")
        if len(bk) != 1:
            raise KNNMemoryError("the tokenizer has no single-token '\\n' to use as the bookkeeping token")
        cfg = model.config
        return cls(settings, settings.layers, cfg.n_head, cfg.n_embd // cfg.n_head, model_fingerprint(model),
                   tokenizer_meta, bk[0], device=next(model.parameters()).device)

    # -- grow, forget --------------------------------------------------------

    @torch.no_grad()
    def add_tokens(self, model, tokens: list[int], source: str = "", text: str = "") -> int:
        """Run tokens through the model in windows of block_size, each starting with the
        bookkeeping token, and keep every memory layer's keys and values. Returns the document id."""
        self._check_model(model)
        if not tokens:
            raise KNNMemoryError(f"document {source!r} is empty")
        step = model.config.block_size - 1
        windows = [[self.bookkeeping_token] + tokens[i:i + step] for i in range(0, len(tokens), step)]
        captured = {L: [] for L in self.layers}

        def capture(attn, q, k, v, attend):  # a clean pass: record, never retrieve
            captured[attn.layer_idx].append((k[:, :, self.remove_bookkeeping:], v[:, :, self.remove_bookkeeping:]))
            return attend(q, k, v)

        saved = {L: model.attentions[L].memory for L in self.layers}
        was_training = model.training
        model.eval()
        try:
            for L in self.layers:
                model.attentions[L].memory = capture
            full = [w for w in windows if len(w) == step + 1]
            batches = [full[i:i + 16] for i in range(0, len(full), 16)] + [[w] for w in windows if len(w) <= step]
            for batch in batches:
                model(torch.tensor(batch, device=self.device))
        finally:
            for L in self.layers:
                model.attentions[L].memory = saved[L]
            model.train(was_training)
        # windows of a batch are rows: (b, H, t, d) -> (H, b * t, d), window after window
        flat = lambda xs: torch.cat([x.transpose(0, 1).reshape(self.n_head, -1, self.head_size) for x in xs], 1)
        return self.add_entries({L: flat([k for k, _ in captured[L]]) for L in self.layers},
                                {L: flat([v for _, v in captured[L]]) for L in self.layers}, source, text)

    def add_entries(self, keys: dict, values: dict, source: str = "", text: str = "") -> int:
        """Append one document's entries: keys[L], values[L] of shape (H, n, d) per memory layer."""
        n = keys[self.layers[0]].size(1)
        for L in self.layers:
            if keys[L].shape != (self.n_head, n, self.head_size) or values[L].shape != (self.n_head, n, self.value_size):
                raise KNNMemoryError(f"layer {L}: keys must be ({self.n_head}, {n}, {self.head_size}) and values "
                                     f"({self.n_head}, {n}, {self.value_size})")
            self.keys[L] = torch.cat([self.keys[L], keys[L].float().to(self.device)], 1)
            self.values[L] = torch.cat([self.values[L], values[L].float().to(self.device)], 1)
        doc_id = max((d["id"] for d in self.documents), default=-1) + 1
        self.doc_ids = torch.cat([self.doc_ids, torch.full((n,), doc_id, dtype=torch.long, device=self.device)])
        self.documents.append({"id": doc_id, "source": source, "text": text, "n_tokens": n})
        self._indexes = {}
        return doc_id

    def add_text(self, model, tokenizer, text: str, source: str = "") -> int:
        return self.add_tokens(model, tokenizer.encode(text), source=source, text=text)

    def remove(self, doc_id: int):
        if not any(d["id"] == doc_id for d in self.documents):
            raise KNNMemoryError(f"no document {doc_id} in the memory (documents: {[d['id'] for d in self.documents]})")
        keep = self.doc_ids != doc_id
        for L in self.layers:
            self.keys[L], self.values[L] = self.keys[L][:, keep], self.values[L][:, keep]
        self.doc_ids = self.doc_ids[keep]
        self.documents = [d for d in self.documents if d["id"] != doc_id]
        self._indexes = {}

    def clear(self):
        for doc in list(self.documents):
            self.remove(doc["id"])

    # -- search ----------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The search backend in use; 'auto' picks the faster exact one (AUTO_FAISS_FROM): faiss-flat
        on CPU when only position 0 can be chosen (mem_frac=0: one query per head and row), else torch."""
        s = self.settings
        if s.knn_backend != "auto":
            return s.knn_backend
        few_queries = s.mem_frac == 0
        return "faiss-flat" if self.device.type == "cpu" and few_queries and len(self) >= AUTO_FAISS_FROM else "torch"

    def index(self, layer: int):
        if layer not in self._indexes:
            s = self.settings
            if self.backend == "torch":
                self._indexes[layer] = TorchIndex(self.keys[layer], s.knn_metric)
            else:
                self._indexes[layer] = FaissIndex(self.keys[layer], s.knn_metric, self.backend, s.knn_nlist,
                                                  s.knn_nprobe, s.knn_pq_m)
        return self._indexes[layer]

    # -- the hook --------------------------------------------------------------

    def attach(self, model):
        """Plug into the model's attention at every layer with k > 0."""
        self._check_model(model)
        self.settings.check(model.config.n_layer)
        missing = [L for L in self.settings.layers if L not in self.layers]
        if missing:
            raise KNNMemoryError(f"knn asks for layers {missing}, but this memory holds layers {self.layers}: "
                               "build a memory with those layers")
        for attn in model.attentions:
            k = self.settings.knn[attn.layer_idx] if self.settings.knn else 0
            attn.memory = KNNAttention(self, attn.layer_idx, k) if k > 0 else None

    @staticmethod
    def detach(model):
        for attn in model.attentions:
            attn.memory = None

    def _check_model(self, model):
        cfg = model.config
        if (cfg.n_head, cfg.n_embd // cfg.n_head) != (self.n_head, self.head_size) or max(self.layers) >= cfg.n_layer:
            raise KNNMemoryError(f"this memory was built by a model with {self.n_head} heads of size {self.head_size} "
                               f"at layers {self.layers}; the model has {cfg.n_layer} layers of {cfg.n_head} heads "
                               f"of size {cfg.n_embd // cfg.n_head}")

    # -- save, load ------------------------------------------------------------

    def manifest(self) -> dict:
        return {
            "format_version": FORMAT_VERSION, "kind": self.KIND, "layers": self.layers,
            "n_head": self.n_head, "head_size": self.head_size, "value_size": self.value_size, "count": len(self),
            "fingerprint": self.fingerprint, "tokenizer": self.tokenizer,
            "bookkeeping_token": self.bookkeeping_token, "remove_bookkeeping": self.remove_bookkeeping,
            "metric": self.settings.knn_metric, "backend": self.backend,
            "documents": self.documents,
        }

    def save(self, path: str):
        """Write the memory folder atomically: a new folder is written beside the old one and
        swapped in by renames, so a crash leaves the previous memory (or path.old) intact."""
        from safetensors.torch import save_file
        path = os.path.abspath(path)
        tmp, old = path + ".tmp", path + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        tensors = {"doc_ids": self.doc_ids.cpu().contiguous()}
        for L in self.layers:
            tensors[f"keys.{L}"] = self.keys[L].cpu().contiguous()
            tensors[f"values.{L}"] = self.values[L].cpu().contiguous()
        save_file(tensors, os.path.join(tmp, "kv.safetensors"))
        if self.backend != "torch" and len(self):
            import faiss
            for L in self.layers:
                for h, ix in enumerate(self.index(L).indexes):
                    ix = faiss.index_gpu_to_cpu(ix) if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(ix).__name__ else ix
                    faiss.write_index(ix, os.path.join(tmp, f"index.{L}.{h}.faiss"))
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(self.manifest(), f, indent=1)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, path: str, model, settings: KNNSettings, force: bool = False) -> "KNNMemory":
        """Load a memory folder for `model`; refuses one built by other weights unless force."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        path = os.path.abspath(path)
        if not os.path.isdir(path) and os.path.isdir(path + ".old"):
            path = path + ".old"  # a save was interrupted between its two renames
        manifest_path = os.path.join(path, "manifest.json")
        if not os.path.isfile(manifest_path):
            raise KNNMemoryError(f"{path} is not a memory folder (no manifest.json): build one with memory_text=... "
                               "and memory_save=...")
        try:
            with open(manifest_path) as f:
                man = json.load(f)
        except json.JSONDecodeError as e:
            raise KNNMemoryError(f"{manifest_path} is corrupt ({e}); rebuild the memory from its texts") from None
        if man.get("kind") != cls.KIND or man.get("format_version") != FORMAT_VERSION:
            raise KNNMemoryError(f"{path}: not a {cls.KIND} of format {FORMAT_VERSION} "
                               f"(kind {man.get('kind')!r}, format {man.get('format_version')!r})")
        fp = model_fingerprint(model)
        if man["fingerprint"] != fp and not force:
            raise KNNMemoryError(f"{path} was built by another model (fingerprint {man['fingerprint']}, this model "
                               f"{fp}): its keys and values mean nothing here. Rebuild it from its texts with this "
                               "model, or pass memory_force=True to use it anyway")
        mem = cls(settings, man["layers"], man["n_head"], man["head_size"], man["fingerprint"], man["tokenizer"],
                  man["bookkeeping_token"], device=next(model.parameters()).device, value_size=man.get("value_size"))
        mem.remove_bookkeeping = man["remove_bookkeeping"]
        mem._check_model(model)
        try:
            tensors = load_file(os.path.join(path, "kv.safetensors"))
        except (SafetensorError, OSError, ValueError) as e:
            raise KNNMemoryError(f"{path}/kv.safetensors is missing or corrupt ({e}); rebuild the memory") from None
        shape = (man["n_head"], man["count"], man["head_size"])
        for L in mem.layers:
            k, v = tensors.get(f"keys.{L}"), tensors.get(f"values.{L}")
            if k is None or v is None or tuple(k.shape) != shape or tuple(v.shape) != shape[:2] + (mem.value_size,):
                raise KNNMemoryError(f"{path}: tensors of layer {L} are missing or not of shape {shape}; "
                                   "the folder is damaged, rebuild the memory")
            mem.keys[L], mem.values[L] = k.to(mem.device), v.to(mem.device)
        mem.doc_ids = tensors["doc_ids"].to(mem.device)
        mem.documents = man["documents"]
        if mem.backend != "torch" and mem.backend == man["backend"] and settings.knn_metric == man["metric"]:
            import faiss
            for L in mem.layers:
                files = [os.path.join(path, f"index.{L}.{h}.faiss") for h in range(mem.n_head)]
                if all(os.path.isfile(f) for f in files):
                    s = settings
                    mem._indexes[L] = FaissIndex(mem.keys[L], s.knn_metric, mem.backend, s.knn_nlist, s.knn_nprobe,
                                                 s.knn_pq_m, indexes=[faiss.read_index(f) for f in files])
        return mem


class KNNAttention:
    """The hook at one memory layer (see the module docstring and knn-memory.md for the steps).

    Reference mode (knn_recompute=True): the newest token's attention row chooses the (head,
    position) pairs whose values are replaced, for every query; so earlier positions' outputs
    change with each new token and decoding recomputes the layers from here up (model.KVCache).
    Causal mode: every query row chooses and mixes for itself (with its own query), and its
    output is what the replaced values add to plain attention; earlier rows never change.
    """

    def __init__(self, memory: KNNMemory, layer: int, k: int):
        self.memory, self.layer, self.k = memory, layer, k
        self.recompute = memory.settings.knn_recompute  # read by GPT.generate

    def __call__(self, attn, q, k, v, attend):
        s = self.memory.settings
        B, H, T, d = q.shape
        Tk = k.size(2)
        if len(self.memory) == 0:
            return attend(q, k, v)
        scale = 1.0 / math.sqrt(d)
        if self.recompute:
            assert T == Tk, "reference mode needs every position's query: generate recomputes (see KVCache)"
            rows = q[:, :, -1:]  # only the newest token's attention row decides
        else:
            rows = q
        # 1-2. attention rows (B, H, R, Tk) decide which positions use the memory; query row r sits at
        # position Tk - R + r and sees the first Tk - R + r + 1 keys
        R = rows.size(2)
        att = (rows @ k.transpose(-2, -1)).float() * scale
        seen = torch.arange(Tk, device=q.device)[None, :] <= torch.arange(Tk - R, Tk, device=q.device)[:, None]
        att = F.softmax(att.masked_fill(~seen, float("-inf")), dim=-1)  # (B, H, R, Tk)
        chosen = torch.zeros_like(att, dtype=torch.bool)
        chosen[..., 0] = att[..., 0] > s.bookkeeping_frac
        if s.mem_frac > 0:
            context = torch.arange(Tk - R + 1, Tk + 1, device=q.device, dtype=att.dtype)[:, None]  # (R, 1)
            chosen[..., 1:] = (att[..., 1:] >= 1.0 / (s.mem_frac * context)) & seen[:, 1:]
        b, h, r, j = chosen.nonzero(as_tuple=True)  # (M,) each
        if b.numel() == 0:
            return attend(q, k, v)
        k_j, v_j = k[b, h, j].float(), v[b, h, j].float()  # (M, d)
        q_r = rows[b, h, r].float()  # (M, d) the deciding row's query
        # the reference mixes with the chosen position's own query; the causal mode has only the row's
        mix_q = q[b, h, j].float() if s.knn_query == "key" and self.recompute else q_r
        mixed = self.mix(h, k_j, v_j, k_j if s.knn_query == "key" else q_r, mix_q)  # (M, d)
        if self.recompute:
            # 7. the unchanged attention pattern applied to the new values
            v = v.clone()
            v[b, h, j] = mixed.to(v.dtype)
            return attend(q, k, v)
        # causal: row r reads att[r, j] * (v'_j - v_j) more than plain attention
        y = attend(q, k, v)
        delta = att[b, h, r, j][:, None] * (mixed - v_j)
        return y.index_put((b, h, r), delta.to(y.dtype), accumulate=True)

    def mix(self, h, k_j, v_j, probe, mix_q):
        """Steps 3-6 for M chosen pairs of heads h: search, candidates, softmax mix, residual."""
        mem, s = self.memory, self.memory.settings
        kk = min(self.k, len(mem))
        ids = mem.index(self.layer).search(h, probe, kk)  # (M, kk)
        cand_k = mem.keys[self.layer][h[:, None], ids]  # (M, kk, d)
        cand_v = mem.values[self.layer][h[:, None], ids]  # (M, kk, d)
        if not s.resid_only:  # the current pair is a candidate too
            cand_k = torch.cat([cand_k, k_j[:, None]], 1)
            cand_v = torch.cat([cand_v, v_j[:, None]], 1)
        scale = 1.0 / math.sqrt(k_j.size(-1))
        w = F.softmax(s.knn_softmax_influence * (cand_k @ mix_q[:, :, None]).squeeze(-1) * scale, dim=-1)  # (M, c)
        mixed = (w[:, :, None] * cand_v).sum(1)  # (M, d)
        if s.resid_frac > 0:
            mixed = (1 - s.resid_frac) * mixed + s.resid_frac * v_j
        return mixed


# ---- Memorizing Transformer layer (Wu et al., ICLR 2022) ----
# One attention layer (GPTConfig.knn_layer) whose heads also attend to the top-k of their own past
# (key, value) pairs, kept per batch row in a FIFO ring: one (row, head) group of the shared exact
# search (exact_search) per pair, all rows and heads in one batched matrix product.

MEMORIZING_GATE_INIT = -3.0  # sigmoid(-3) ~ 0.05: the memory starts with a small but nonzero share


def memorizing_layer(model):
    """The MemorizingMemory of a GPT (unwrapped, not DDP/compiled), or None when it has none."""
    for attn in model.attentions:
        if isinstance(attn.memory, MemorizingMemory):
            return attn.memory
    return None


def add_memorizing_layer(model, layer: int, topk: int, size: int, search_dtype: str = "float32"):
    """Give a GPT (e.g. pretrained GPT-2) a memorizing layer at `layer`; recorded in its config."""
    cfg = model.config
    if not 0 <= layer < cfg.n_layer:
        raise ValueError(f"knn_layer={layer}, but the model has layers 0..{cfg.n_layer - 1}")
    cfg.knn_layer, cfg.knn_topk, cfg.knn_memory_size, cfg.knn_search_dtype = layer, topk, size, search_dtype
    model.attentions[layer].memory = MemorizingMemory(cfg.n_head, cfg.n_embd // cfg.n_head, topk, size,
                                                      search_dtype).to(next(model.parameters()).device)


class MemorizingMemory(nn.Module):
    """The kNN-attention memory of one layer, at the attention seam (model.py).

    Every head attends causally to its local window (the layer's own attention) and to the topk
    (key, value) pairs retrieved from its memory of past windows; retrieval ranks by cosine
    (normalised queries and keys), the retrieved pairs are attended to with the ordinary scaled
    dot product; a learned per-head gate g = sigmoid(gate_bias) mixes: y = (1 - g) y_local + g y_mem.
    After a forward pass with `write` set, the window's keys and values are appended (detached)
    first-in first-out; so memory entries only ever come from earlier windows.

    The memory is a set of plain tensor attributes, not parameters or registered buffers: it is
    not in the state_dict and DDP never broadcasts it, so each rank keeps its own. It holds
    n_rows rows (train.py: one per batch row of every micro-step); `rows` picks the slice of rows
    the next forward pass reads and writes (None: the first B).
    """

    def __init__(self, n_head: int, head_size: int, topk: int, size: int, search_dtype: str = "float32"):
        super().__init__()
        if topk < 1 or size < 1:
            raise ValueError(f"knn_topk={topk} and knn_memory_size={size} must both be >= 1")
        if search_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"knn_search_dtype={search_dtype!r}; choose 'float32' or 'bfloat16'")
        self.n_head, self.head_size, self.topk, self.size = n_head, head_size, topk, size
        self.search_dtype = getattr(torch, search_dtype)
        self.gate_bias = nn.Parameter(torch.full((n_head,), MEMORIZING_GATE_INIT))
        self.write = True  # append each forward pass's window to the memory
        self.read = True  # False: only write (reading a text into memory; layer L's keys do not depend on reads at L)
        self.rows = None  # slice of memory rows used by the next forward pass
        self.n_rows = None
        self.mem = None  # {"keys": (R, H, C, d) unit keys, "norms": (R, H, C), "values": (R, H, C, d), "written": (R,)}

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

    def forward(self, attn, q, k, v, attend):
        B, H, T, d = q.shape
        y_local = attend(q, k, v)  # (B, H, T, d)
        if self.mem is None:
            self._alloc(B, k.detach())
        rows = self.rows if self.rows is not None else slice(0, B)  # a slice: the memory rows are views
        rid = torch.arange(self.mem["written"].numel(), device=q.device)[rows]  # (B,) memory rows of the batch
        if rid.numel() != B:
            raise RuntimeError(f"the memory has rows {rows} for a batch of {B}: reset() it or set .rows")
        count = self.mem["written"][rows].clamp(max=self.size)  # (B,)
        n_used = int(count.max())
        y = y_local
        if n_used > 0 and self.read:
            y_mem = self.retrieve(q, rows, count, n_used)
            g = torch.sigmoid(self.gate_bias).to(y_local.dtype).view(1, H, 1, 1)
            # exactly y_local where a row's memory is empty; g = 0 gives y_local bit for bit
            y = torch.where((count > 0).view(B, 1, 1, 1), (1 - g) * y_local + g * y_mem, y_local)
        elif self.training:
            y = y_local + 0 * torch.sigmoid(self.gate_bias).sum()  # in the graph: DDP expects a gradient for it
        if self.write:
            self.append(rid, k[:, :, -T:], v[:, :, -T:])
        return y

    def retrieve(self, q, rows, count, n_used):
        """Attention of every query over its topk nearest memory entries: (B, H, T, d)."""
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
        logits = (k_ret @ q.reshape(G, T, d, 1)).squeeze(-1) / math.sqrt(d)  # (G, T, kk)
        # entries beyond a row's count are empty slots; a row with none keeps finite zeros (gated out)
        empty = (ids >= count.repeat_interleave(H)[:, None, None]) & (count.repeat_interleave(H) > 0)[:, None, None]
        p = F.softmax(logits.float().masked_fill(empty, float("-inf")), dim=-1).to(q.dtype)
        return (p.unsqueeze(-2) @ v_ret).squeeze(-2).view(B, H, T, d)

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


@torch.no_grad()
def generate_with_memory(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None,
                         generators=None, use_cache=True):
    """GPT.generate for a model with a memorizing layer and/or an MNM block: the sequence (prompt,
    then generated tokens) is cut into windows of block_size, as in training. A token is predicted
    from its own window up to it, locally, and from the memories of all earlier windows; a window
    enters the memories once it is full, by one forward pass over it (the same pass with or without
    the KV cache, so cached decoding equals recomputation). Each batch row has its own memories,
    emptied at the start; the memories' training state is put back afterwards."""
    from model import KVCache, append_next
    mems = [m for m in (memorizing_layer(model), mnm_block(model)) if m is not None]
    T = model.config.block_size
    B = idx.size(0)
    saved = [(m.get_state(), m.n_rows, m.write, m.rows) for m in mems]
    for m in mems:
        m.reset(B)
    cache, committed = None, 0
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    try:
        for _ in range(max_new_tokens):
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
            idx, finished = append_next(idx, logits[:, -1, :], done, temperature, top_k, top_p, stop_token, generators)
            if finished:
                break
    finally:
        for m, (state, n_rows, write, rows) in zip(mems, saved):
            m.set_state(state)
            m.n_rows, m.write, m.rows = n_rows, write, rows
    return idx


# ---- kNN-LM (Khandelwal et al., ICLR 2020) ----

class KNNLMDatastore(KNNMemory):
    """A kNN-LM datastore in the memory-folder format (manifest, kv.safetensors, faiss indexes,
    model fingerprint): one "head" at the last layer whose keys are the last block's MLP input
    (the output of its ln_2, n_embd wide) at every position of a corpus and whose value is the
    token that followed. Searched with the same backends (torch exact, faiss flat / IVF)."""
    KIND = "knn-lm-datastore"

    @classmethod
    def create(cls, model, settings: KNNSettings, tokenizer_meta: dict, tokenizer=None):
        cfg = model.config
        return cls(settings, [cfg.n_layer - 1], 1, cfg.n_embd, model_fingerprint(model), tokenizer_meta, None,
                   device=next(model.parameters()).device, value_size=1)

    def _check_model(self, model):
        cfg = model.config
        if cfg.n_embd != self.head_size or self.layers != [cfg.n_layer - 1]:
            raise KNNMemoryError(f"this datastore holds keys of width {self.head_size} from layer {self.layers[0]}; "
                                 f"the model has {cfg.n_layer} layers of width {cfg.n_embd}: build it with this model")

    @property
    def backend(self) -> str:
        # every position queries: the batched matmul beats a per-query faiss flat scan (see KNNMemory.backend)
        return "torch" if self.settings.knn_backend == "auto" else self.settings.knn_backend

    @torch.no_grad()
    def add_tokens(self, model, tokens, source: str = "", text: str = "", batch_size: int = 16) -> int:
        """Keys and next tokens of every position of `tokens`, read in windows of block_size."""
        self._check_model(model)
        T = model.config.block_size
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.numel() < 2:
            raise KNNMemoryError(f"corpus {source!r} needs at least 2 tokens")
        L = self.layers[0]
        keys = []
        was_training = model.training
        model.eval()
        from tqdm import tqdm
        try:
            n = tokens.numel() - 1  # positions that have a next token
            full = n // T
            for i in tqdm(range(0, full, batch_size), desc="datastore", disable=None, delay=2):
                x = tokens[i * T:min(full, i + batch_size) * T].view(-1, T).to(self.device)
                keys.append(last_mlp_input(model, x)[0].reshape(-1, self.head_size).float())
            if n % T:
                keys.append(last_mlp_input(model, tokens[full * T:n][None].to(self.device))[0][0].float())
        finally:
            model.train(was_training)
        values = tokens[1:].float().to(self.device)  # the next token of every position (exact in float32)
        return self.add_entries({L: torch.cat(keys)[None]}, {L: values[None, :, None]}, source, text)

    def next_tokens(self):
        return self.values[self.layers[0]][0, :, 0].long()  # (N,)


def last_mlp_input(model, idx, targets=None):
    """(h (B, T, n_embd), logits (B, T, V)): the last block's ln_2 output at every position (the kNN-LM
    key) and the model's logits, from one forward pass."""
    got = []
    hook = model.transformer.h[-1].ln_2.register_forward_hook(lambda m, i, o: got.append(o))
    try:
        logits, _ = model(idx, targets if targets is not None else torch.zeros_like(idx))
    finally:
        hook.remove()
    return got[0], logits


def knn_probs(h, store: KNNLMDatastore, k: int, temperature: float, vocab_size: int, chunk: int = 1024):
    """p_kNN (M, V) for keys h (..., C): softmax(-squared L2 distance / temperature) over the k nearest
    entries, summed per next token."""
    hf = h.detach().float().reshape(-1, h.size(-1))
    L = store.layers[0]
    keys, tok = store.keys[L][0], store.next_tokens()
    kk = min(k, len(store))
    chunk = max(16, min(chunk, (1 << 26) // max(1, len(store))))  # exact search holds chunk x N scores
    out = []
    for s in range(0, hf.size(0), chunk):
        q = hf[s:s + chunk]
        ids = store.index(L).search(torch.zeros(q.size(0), dtype=torch.long, device=q.device), q, kk)  # (M, kk)
        w = F.softmax(-((keys[ids] - q[:, None]) ** 2).sum(-1) / temperature, dim=-1)  # (M, kk)
        out.append(torch.zeros(q.size(0), vocab_size, device=q.device).scatter_add_(1, tok[ids], w))
    return torch.cat(out)


def knnlm_mix(logits, p_knn, lam: float):
    """log(lam * p_kNN + (1 - lam) * p_LM) (..., V); lam = 0 gives log_softmax(logits) bit for bit
    (log 0 = -inf drops p_kNN exactly)."""
    lp = F.log_softmax(logits.detach().float(), dim=-1)
    log_knn = math.log(lam) + p_knn.log() if lam > 0 else torch.full_like(p_knn, float("-inf"))
    return torch.logaddexp(log_knn.view_as(lp), math.log1p(-lam) + lp)


def knnlm_log_probs(logits, h, store: KNNLMDatastore, lam: float, k: int, temperature: float):
    """log p = log(lam * p_kNN + (1 - lam) * p_LM) per position: logits (..., V), keys h (..., C)."""
    return knnlm_mix(logits, knn_probs(h, store, k, temperature, logits.size(-1)), lam)


class KNNLM:
    """Plugs a datastore into a GPT for sampling: the model's output logits become kNN-LM log
    probabilities (at every position it computes them for, so GPT.generate and its KV cache work
    unchanged). attach() / detach()."""

    def __init__(self, store: KNNLMDatastore, lam: float, k: int, temperature: float):
        if not 0 <= lam < 1:
            raise KNNMemoryError(f"knnlm_lambda={lam} must be in [0, 1)")
        self.store, self.lam, self.k, self.temperature = store, lam, k, temperature
        self.hooks = []

    def attach(self, model):
        self.store._check_model(model)
        self.detach()
        got = {}
        head = model.transformer.h[-1].ln_2.register_forward_hook(lambda m, i, o: got.__setitem__("h", o))

        def mix(module, inputs, logits):  # lm_head's output for the positions it was given (the last, when sampling)
            h = got["h"][:, -logits.size(1):]
            return knnlm_log_probs(logits, h, self.store, self.lam, self.k, self.temperature).to(logits.dtype)

        self.hooks = [head, model.lm_head.register_forward_hook(mix)]

    def detach(self):
        for hk in self.hooks:
            hk.remove()
        self.hooks = []


# ---- Differentiable neural computer ----

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


# ---- Replay memory ----

class ReplayBuffer:
    """Up to `capacity` stored examples, each a row of one or more tensors (say an image and its
    label), kept on the device they arrive on.

    policy 'ring': the newest examples overwrite the oldest. 'reservoir' (Vitter's algorithm R):
    after n examples were offered, each of them is in the buffer with the same probability
    capacity / n, so old tasks keep their share. sample(n) draws uniformly, with replacement,
    from the filled slots only: an unfilled slot is never returned."""

    def __init__(self, capacity: int, policy: str = "ring", seed: int = 0):
        if capacity < 1 or policy not in ("ring", "reservoir"):
            raise ValueError(f"ReplayBuffer needs capacity >= 1 and policy 'ring' or 'reservoir', "
                             f"got {capacity}, {policy!r}")
        self.capacity, self.policy = capacity, policy
        self.slots = None  # one (capacity, ...) tensor per field, allocated by the first add
        self.filled = 0  # slots 0..filled-1 hold examples
        self.seen = 0  # examples offered so far
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return self.filled

    def add(self, *rows):
        """Offer examples: tensors with the same number of rows, the same fields every call."""
        n = rows[0].size(0)
        if self.slots is None:
            self.slots = [torch.zeros((self.capacity, *r.shape[1:]), dtype=r.dtype, device=r.device) for r in rows]
        if len(rows) != len(self.slots) or any(r.size(0) != n or r.shape[1:] != s.shape[1:] or r.dtype != s.dtype
                                               for r, s in zip(rows, self.slots)):
            raise ValueError("ReplayBuffer.add: every call must give the same fields, each with rows of the "
                             f"stored shape and dtype ({[(tuple(s.shape[1:]), s.dtype) for s in self.slots]})")
        for i in range(n):  # one at a time: a later example may replace an earlier one of the same call
            if self.policy == "ring":
                dest = self.seen % self.capacity
            else:
                dest = self.seen if self.seen < self.capacity else int(self.rng.integers(0, self.seen + 1))
            if dest < self.capacity:
                for s, r in zip(self.slots, rows):
                    s[dest] = r[i]
            self.seen += 1
        self.filled = min(self.capacity, self.seen)

    def sample(self, n: int):
        """n stored examples drawn uniformly from the filled slots: a tuple of (n, ...) tensors."""
        if self.filled == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty; add examples first")
        idx = torch.from_numpy(self.rng.integers(0, self.filled, size=n)).to(self.slots[0].device)
        return tuple(s[idx] for s in self.slots)


# ---- Metalearned neural memory ----

MNM_WRITES = ("local", "grad", "titans")


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
    every token writes its own pair, each with 1/S of its strength (the segment's S writes then move the
    weights about as far as one).
    The gradient is written out by hand (two layers), so meta-training back-propagates through the
    writes with one ordinary backward pass. The write loss returned is the beta-weighted |f(k) - v|^2
    after the write, which the trainer adds to the task loss (write_loss_weight)."""

    write_loss_weight = 0.1
    beta_offset = 0.0  # added to the strength logit (kept as the knob for a gentler start)

    def __init__(self, n_embd: int, heads: int, key_size: int, hidden: int, write: str = "local",
                 pool: bool = False):
        super().__init__()
        if write not in MNM_WRITES:
            raise ValueError(f"mnm_write must be one of {MNM_WRITES}, got {write!r}")
        if n_embd % heads:
            raise ValueError(f"n_embd {n_embd} must be a multiple of mnm_heads {heads}")
        self.write_rule, self.pool = write, pool
        self.H, self.dk, self.dv, self.dh = heads, key_size, n_embd // heads, hidden
        H, dk, dv, dh = self.H, self.dk, self.dv, self.dh
        self.c_mem = nn.Linear(n_embd, H * (2 * dk + dv + 2))  # write key, read key, value, strength, pooling score
        self.w1 = nn.Parameter(torch.randn(H, dh, dk))  # initial fast weights; unit keys -> unit-variance preactivations
        self.w2 = nn.Parameter(torch.zeros(H, dv, dh))  # an empty memory reads zeros: reads are what was written
        if write == "local":
            self.target = nn.Parameter(torch.randn(H, dh, dv) / math.sqrt(dv))  # P: layer-1 targets from v_w
        else:
            self.lr = nn.Parameter(torch.zeros(H))  # softplus(0) ~ 0.69
        if write == "titans":
            self.c_gate = nn.Linear(n_embd, 2 * H)  # momentum eta and forgetting alpha, per head
        self.c_proj = nn.Linear(H * dv, n_embd)
        self.match_read_keys()

    @torch.no_grad()
    def match_read_keys(self):
        """Start the read-key projection equal to the write-key one (call again after re-initialising
        c_mem): a token read in the context it was written in then finds its value from the first step,
        which gives meta-training a signal to start from. They are trained apart from there."""
        w = self.c_mem.weight.view(self.H, 2 * self.dk + self.dv + 2, -1)
        b = self.c_mem.bias.view(self.H, 2 * self.dk + self.dv + 2)
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

    def forward(self, h, mask, state: dict, valid=None, read_first=False):
        """h (B, S, n_embd) a segment's outputs, mask (B, S) its real tokens, valid (B,) the rows that have
        a segment here (others keep their state). Returns (reads (B, S, n_embd), new state, write loss)."""
        B, S, _ = h.shape
        p = self.c_mem(h).view(B, S, self.H, -1).transpose(1, 2)  # (B, H, S, 2 dk + dv + 2)
        kw, kr, v, b, score = p.split([self.dk, self.dk, self.dv, 1, 1], dim=-1)
        live = mask if valid is None else mask & valid[:, None]  # (B, S)
        if self.pool:  # one write per segment: its tokens' keys, values and strengths, attention-pooled
            a = score.masked_fill(~mask[:, None, :, None], float("-inf")).softmax(dim=2)  # (B, H, S, 1)
            kw, v, b = [(a * t).sum(2, keepdim=True) for t in (kw, v, b)]
            live = live.any(1, keepdim=True)  # (B, 1)
        kw, kr = F.normalize(kw, dim=-1), F.normalize(kr, dim=-1)
        beta = torch.sigmoid(b + self.beta_offset) * live[:, None, :, None]  # (B, H, S or 1, 1)
        if not self.pool:  # the segment's tokens share one step (their mean): S full-strength steps at once overshoot
            beta = beta / live.sum(1).clamp(min=1)[:, None, None, None]
        if read_first:
            reads, _ = self.recall(state, kr)
        new = self.write(state, kw, v, beta, h, mask)
        if valid is not None:  # rows without a segment here keep their memory untouched
            keep = valid[:, None, None, None]
            new = {k: torch.where(keep, t, state[k]) for k, t in new.items()}
        if not read_first:
            reads, _ = self.recall(new, kr)
        stored, _ = self.recall(new, kw)
        weight = beta.detach()
        write_loss = ((stored - v).pow(2).mean(-1, keepdim=True) * weight).sum() / weight.sum().clamp(min=1e-6)
        return self.c_proj(reads.transpose(1, 2).reshape(B, S, -1)), new, write_loss


MNM_SHAPE_KEYS = ("mnm_heads", "mnm_key_size", "mnm_hidden", "mnm_write")


def mnm_block(model):
    """The MNMBlock of a GPT (unwrapped), or None when it has none."""
    return next((b for b in model.transformer.h if isinstance(b, MNMBlock)), None)


def add_mnm_block(model, layer: int, heads: int, key_size: int, hidden: int, write: str):
    """Give a GPT (e.g. pretrained GPT-2) an MNMBlock at `layer`; recorded in its config."""
    cfg = model.config
    if not 0 <= layer < cfg.n_layer:
        raise ValueError(f"mnm_layer={layer}, but the model has layers 0..{cfg.n_layer - 1}")
    cfg.mnm_layer, cfg.mnm_heads, cfg.mnm_key_size, cfg.mnm_hidden, cfg.mnm_write = layer, heads, key_size, hidden, write
    mnm = MNM(cfg.n_embd, heads, key_size, hidden, write)
    mnm.apply(model._init_weights)
    nn.init.normal_(mnm.c_proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))  # a residual projection
    mnm.match_read_keys()
    model.transformer.h[layer] = MNMBlock(model.transformer.h[layer], mnm).to(next(model.parameters()).device)


class MNMBlock(nn.Module):
    """A GPT block followed by an MNM that a long document is written into segment by segment:

        model.transformer.h[L] = MNMBlock(model.transformer.h[L], MNM(n_embd, 4, 32, 64))
        block.reset(); then model(segment_1), model(segment_2), ...   # in order, one document per row

    Each forward call is one segment: its tokens first read what the earlier segments wrote (so no
    token sees its own segment's future), then the segment is written (every token its own pair).

    The state carried from one call to the next is detached: back-propagation is truncated at the
    segment boundary, so a document's graph never grows past one segment. Within a segment the task
    loss reaches the read path (the read-key part of c_mem, c_proj) and, in rows whose document starts
    here, the initial fast weights w1, w2 they read; the write path (write keys, values, strengths,
    the rule's own parameters) learns from write_loss, which the trainer adds to the task loss.

    Rows follow MemorizingMemory's protocol (train.py keeps one row per batch row of every micro-step):
    reset(n_rows), `rows` (the slice of rows the next call reads and writes), clear_rows(rows) (those
    rows' documents ended: they go back to the learned initial weights), get_state / set_state."""

    def __init__(self, block: nn.Module, mnm: MNM):
        super().__init__()
        self.block, self.mnm = block, mnm
        self.write_loss = None
        self.write = True  # False: read only (generation reads a window's tokens one by one, then writes it whole)
        self.reset()

    @property
    def attn(self):  # GPT.attentions finds the wrapped block's attention (and any memory attached there)
        return self.block.attn

    def reset(self, n_rows: int | None = None):
        """Forget every row; the next call allocates n_rows rows (None: its batch size)."""
        self.n_rows, self.rows, self.state = n_rows, None, None
        self.fresh = None  # (R,) bool: the row holds the initial weights (read live, so they get the gradient)

    def clear_rows(self, rows):
        """Send these rows (indices or a bool mask, of all rows) back to the learned initial weights."""
        if self.state is not None:
            self.fresh[rows] = True
            self.state = {k: v.detach() for k, v in self._start_fresh(self.state, self.fresh).items()}

    def _start_fresh(self, state: dict, fresh):
        init = self.mnm.initial_state(fresh.numel())
        return {k: torch.where(fresh.view(-1, *[1] * (v.dim() - 1)), init[k].to(v.dtype), v) for k, v in state.items()}

    def get_state(self) -> dict:
        """The rows' fast weights and fresh flags, for an exact resume (train.py keeps them in the checkpoint)."""
        return {} if self.state is None else {**{k: v.detach().clone() for k, v in self.state.items()},
                                              "fresh": self.fresh.clone()}

    def set_state(self, state: dict):
        state = dict(state)
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
        reads, new, self.write_loss = self.mnm(x, live, state, read_first=True)
        if self.write:
            self.state = {k: torch.cat([v[:lo], new[k].detach(), v[hi:]]) for k, v in self.state.items()}
            self.fresh[lo:hi] = False
        return x + reads


def save_conversation(path: str, state: dict, embedding, vocab: dict, extra: dict | None = None):
    """A conversation's state as two files: PATH.safetensors (the memory's fast weights and the token
    embedding, which holds the rows of words added while chatting) and PATH.json (the vocabulary with
    its counts, and `extra`). Both are written atomically; no pickle."""
    from safetensors.torch import save
    tensors = {f"memory.{k}": v.detach().contiguous().cpu() for k, v in state.items()}
    tensors["wte"] = embedding.detach().contiguous().cpu()
    atomic_write(f"{path}.safetensors", lambda f: f.write(save(tensors)))
    atomic_write(f"{path}.json", lambda f: json.dump({"format_version": FORMAT_VERSION, "vocab": vocab,
                                                      **(extra or {})}, f), "w")


def load_conversation(path: str, device="cpu"):
    """(memory state, embedding, vocab dict, the JSON's other entries) as save_conversation wrote them."""
    from safetensors.torch import load_file
    for name in (f"{path}.safetensors", f"{path}.json"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"no conversation state {name}: save one first (/save {path} in the chat)")
    try:
        tensors = load_file(f"{path}.safetensors", device=str(device))
        with open(f"{path}.json") as f:
            meta = json.load(f)
    except Exception as e:
        raise ValueError(f"conversation state {path} is damaged ({type(e).__name__}: {e})") from None
    if meta.get("format_version") != FORMAT_VERSION or "vocab" not in meta or "wte" not in tensors:
        raise ValueError(f"{path}.json/.safetensors is not a conversation state of this version")
    state = {k[len("memory."):]: v for k, v in tensors.items() if k.startswith("memory.")}
    return state, tensors["wte"], meta.pop("vocab"), meta
