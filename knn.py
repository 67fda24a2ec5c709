"""
The persistent kNN attention memory and the kNN-LM datastore: a store of keys and values kept
per layer and head, searched while generating. Plugs into the attention seam of model.py
(`attn.memory`, see model.py's docstring) from outside; model.py never imports this file.

Persistent kNN attention memory
-------------------------------
The "medium-term memory" method (docs/knn-memory.md): run a text through the model once, keep
the keys and values of every token at chosen layers, per head, and while generating let the
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

kNN-LM (Khandelwal et al., ICLR 2020)
-------------------------------------
KNNLMDatastore keeps (last block's MLP input, next token) pairs of a corpus in the memory-folder
format; knnlm_log_probs mixes p_kNN into the model's distribution. It searches with the same
backends (exact_search, which the trainable Memorizing layer in memory.py shares, or faiss).

    store = KNNLMDatastore.create(model, KNNSettings(knn_backend="faiss-ivf"), meta)
    store.add_tokens(model, train_tokens); store.save("datastore")
    KNNLM(store, lam=0.25, k=64, temperature=1.0).attach(model)   # model.generate samples from the mix
"""

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch.nn import functional as F

from common import atomic_save, atomic_write
from prepare import load_meta, open_split

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


# the architecture fields a GPT-2 leaves at these values are left out of the hash, so memories built before the
# Llama family joined GPTConfig keep their fingerprint
GPT2_FAMILY = dict(n_kv_head=None, norm="layernorm", norm_eps=1e-5, pos="learned", rope_theta=10000.0, mlp="gelu",
                   mlp_hidden=None, tie_embeddings=True)


def model_fingerprint(model) -> str:
    """A short hash of the model's shape and weights: a memory only makes sense with the model
    whose keys and values it holds. Samples ~256 values of every tensor, which is enough to tell
    two trainings apart and cheap for GPT-2-sized models."""
    h = hashlib.sha256()
    # the shape: the model's arguments plus the layers of any trainable memory attached to it (a GPT records
    # them in model.memory_args); topk, memory size and search dtype change no weight, and the dict is built so
    # that models saved before the two were kept apart hash as they did
    shape = {k: v for k, v in asdict(model.config).items()
             if k != "dropout" and not (k in GPT2_FAMILY and v == GPT2_FAMILY[k])}
    mem = dict(getattr(model, "memory_args", None) or {})
    if mem.get("knn_layer", -1) >= 0:
        shape["knn_layer"] = mem["knn_layer"]
    if mem.get("mnm_layer", -1) >= 0:
        shape.update({k: mem[k] for k in ("mnm_layer", "mnm_heads", "mnm_key_size", "mnm_hidden", "mnm_write")})
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
        # n_head: the heads stored, the model's key/value heads (n_kv_head; = n_head without grouped-query attention)
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
        # one store per key/value head (grouped-query attention: n_kv_head < n_head), shared by its query heads
        return cls(settings, settings.layers, cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head,
                   model_fingerprint(model), tokenizer_meta, bk[0], device=next(model.parameters()).device)

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
            kept = k
            if attn.rotary is not None:  # keys are stored before the rotary embedding: key j of a window sat at j
                kept = attn.rotary.rotate(k, -torch.arange(k.size(2), device=k.device))
            captured[attn.layer_idx].append((kept[:, :, self.remove_bookkeeping:], v[:, :, self.remove_bookkeeping:]))
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
        kv_heads = cfg.n_kv_head or cfg.n_head
        if (kv_heads, cfg.n_embd // cfg.n_head) != (self.n_head, self.head_size) or max(self.layers) >= cfg.n_layer:
            raise KNNMemoryError(f"this memory was built by a model with {self.n_head} key/value heads of size "
                               f"{self.head_size} at layers {self.layers}; the model has {cfg.n_layer} layers of "
                               f"{kv_heads} key/value heads of size {cfg.n_embd // cfg.n_head}")

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

    Rotary embeddings and grouped-query attention (the Llama family). The store holds keys
    *before* the rotary embedding, one store per key/value head. The positions that use the memory
    are chosen from the model's real attention rows (rotated q and k), one row per *query* head;
    search and mixing then work on unrotated vectors, so a retrieved key is scored as if it sat at
    relative distance 0 from the query: the probe is the chosen position's unrotated key (key
    search; kv head h // g's store, g = n_head // n_kv_head) or the query head's own unrotated query
    (query search), and the mix weights use the unrotated mixing query. The replaced value belongs
    to the query head that chose it: values are expanded to n_head heads before replacing. Without
    rotary embeddings and with n_kv_head == n_head (GPT-2) every step is the plain one.
    """

    def __init__(self, memory: KNNMemory, layer: int, k: int):
        self.memory, self.layer, self.k = memory, layer, k
        self.recompute = memory.settings.knn_recompute  # read by GPT.generate

    def __call__(self, attn, q, k, v, attend):
        s = self.memory.settings
        B, H, T, d = q.shape
        Hkv, Tk = k.size(1), k.size(2)
        if len(self.memory) == 0:
            return attend(q, k, v)
        g = H // Hkv  # query heads per key/value head
        rot = getattr(attn, "rotary", None)
        scale = 1.0 / math.sqrt(d)
        if self.recompute:
            assert T == Tk, "reference mode needs every position's query: generate recomputes (see KVCache)"
            rows = q[:, :, -1:]  # only the newest token's attention row decides
        else:
            rows = q
        # 1-2. attention rows (B, H, R, Tk) decide which positions use the memory; query row r sits at
        # position Tk - R + r and sees the first Tk - R + r + 1 keys. Rotated q and k: the model's own pattern
        R = rows.size(2)
        if g == 1:
            att = (rows @ k.transpose(-2, -1)).float() * scale
        else:  # query head h reads key head h // g: group the rows by key head instead of repeating k
            att = (rows.reshape(B, Hkv, g * R, d) @ k.transpose(-2, -1)).view(B, H, R, Tk).float() * scale
        seen = torch.arange(Tk, device=q.device)[None, :] <= torch.arange(Tk - R, Tk, device=q.device)[:, None]
        att = F.softmax(att.masked_fill(~seen, float("-inf")), dim=-1)  # (B, H, R, Tk)
        chosen = torch.zeros_like(att, dtype=torch.bool)
        chosen[..., 0] = att[..., 0] > s.bookkeeping_frac
        if s.mem_frac > 0:
            context = torch.arange(Tk - R + 1, Tk + 1, device=q.device, dtype=att.dtype)[:, None]  # (R, 1)
            chosen[..., 1:] = (att[..., 1:] >= 1.0 / (s.mem_frac * context)) & seen[:, 1:]
        b, h, r, j = chosen.nonzero(as_tuple=True)  # (M,) each; h is the query head
        if b.numel() == 0:
            return attend(q, k, v)
        kh = h // g if g > 1 else h  # its key/value head
        k_j, v_j = k[b, kh, j].float(), v[b, kh, j].float()  # (M, d)
        q_r = rows[b, h, r].float()  # (M, d) the deciding row's query
        # the reference mixes with the chosen position's own query; the causal mode has only the row's
        own_query = s.knn_query == "key" and self.recompute
        mix_q = q[b, h, j].float() if own_query else q_r
        if rot is not None:  # undo the rotary embedding: the store holds unrotated keys (relative distance 0)
            k_j = rot.rotate(k_j, -j)
            q_r = rot.rotate(q_r, -(Tk - R + r))
            mix_q = rot.rotate(mix_q, -j) if own_query else q_r
        mixed = self.mix(kh, k_j, v_j, k_j if s.knn_query == "key" else q_r, mix_q)  # (M, d)
        if self.recompute:
            # 7. the unchanged attention pattern applied to the new values (per query head)
            if g == 1:
                v = v.clone()
            else:
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            v[b, h, j] = mixed.to(v.dtype)
            return attend(q, k, v)
        # causal: row r reads att[r, j] * (v'_j - v_j) more than plain attention
        y = attend(q, k, v)
        delta = att[b, h, r, j][:, None] * (mixed - v_j)
        return y.index_put((b, h, r), delta.to(y.dtype), accumulate=True)

    def mix(self, h, k_j, v_j, probe, mix_q):
        """Steps 3-6 for M chosen pairs of stored (key/value) heads h: search, candidates, softmax mix,
        residual."""
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

    @classmethod
    def open_or_build(cls, path: str, model, settings: KNNSettings, meta: dict, dataset_dir: str | None = None,
                      max_tokens: int | None = None, force: bool = False) -> "KNNLMDatastore":
        """The datastore in folder `path`; when there is none, built from dataset_dir's train split (its
        first max_tokens tokens) and saved there."""
        settings.check(model.config.n_layer)  # the search backend's name
        if os.path.isdir(path):
            store = cls.load(path, model, settings, force=force)
            print(f"loaded datastore {path}: {len(store):,} entries")
            return store
        if dataset_dir is None:
            raise KNNMemoryError(f"no datastore at {path}: build one with evaluate.py eval='knnlm' "
                                 "(eval_dataset names the corpus)")
        tokens = np.asarray(open_split(dataset_dir, "train", load_meta(dataset_dir))[:max_tokens], dtype=np.int64)
        store = cls.create(model, settings, meta)
        store.add_tokens(model, torch.from_numpy(tokens), source=f"{dataset_dir}/train.bin")
        store.save(path)
        print(f"built datastore {path}: {len(store):,} entries ({store.backend})")
        return store

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


