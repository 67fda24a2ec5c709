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
    mem.save("memories/cats")    # a folder: manifest.json, keys/values .npy, ids, faiss indexes
    mem = KNNMemory.load("memories/cats", model, settings)    # keys and values memory-mapped

Every memory entry is one token of one document at every memory layer and head, so entry n is
the same token everywhere and one `doc_ids` vector says where each entry came from.

Scale (docs/knn-scale.md): the hook asks `memory.search(layer, heads, probes, k)` for candidates.
knn_backend='auto' searches exactly while that is cheap and with an IVF index (int8 or 4-bit PQ
codes, candidates re-ranked exactly with the stored keys) beyond, its nprobe tuned at build until
recall@5 against exact search reaches knn_recall_target (stored in the manifest). Keys and values
are kept in knn_dtype (float16 halves them), can be built straight on disk (storage_dir) and are
memory-mapped when loaded, so a memory larger than RAM opens in seconds. A memory can be sharded
over torch.distributed ranks (load(..., shard=(rank, world))): each searches its shard and the
global top k is merged from all_gather.

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
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch.nn import functional as F

from common import atomic_write
from prepare import load_meta, open_split

FORMAT_VERSION = 2  # 2: keys/values as .npy (mappable), stable entry ids, fingerprinted indexes; 1: kv.safetensors
BACKENDS = ("auto", "torch", "faiss-flat", "faiss-fp16", "faiss-sq8", "faiss-ivf", "faiss-ivfsq8", "faiss-ivfpq",
            "faiss-ivfpqfs", "faiss-hnsw")
# measured on 2 CPU cores, 12 heads of 64 (bench.py config/bench_knn.py): with one query per head faiss's
# flat scan beats a matmul + top-k from ~3k entries; with tens of queries per head the batched matmul wins
AUTO_FAISS_FROM = 3000
# config/bench_knn_scale.py (docs/knn-scale.md): an exact scan of 12 heads costs ~1 ms per 10k entries per token,
# 5% of a GPT-2-small CPU decoding step at 20k; IVF-SQ8 + exact re-ranking stays under 1 ms per token to 1M entries
# at recall@5 >= 0.95. IVF-SQ8 holds 72 bytes per entry and head (8.6 GB at 10M x 12 heads): beyond AUTO_PQ_FROM,
# IVF-PQ fast-scan codes (32 bytes for 64 dims, plus 8 for the id) keep a 10M-entry index in ~5 GB
AUTO_IVF_FROM = 20_000
AUTO_PQ_FROM = 2_000_000


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
    knn_backend: str = "auto"  # 'auto': by size (KNNMemory.backend); exact: 'torch' (matmul + top-k), 'faiss-flat';
    # approximate (re-ranked exactly, see knn_refine): 'faiss-fp16', 'faiss-sq8' (every key, in 16 / 8 bits),
    # 'faiss-ivf', 'faiss-ivfsq8', 'faiss-ivfpq', 'faiss-ivfpqfs' (IVF lists of float32 / int8 / PQ / 4-bit PQ
    # codes), 'faiss-hnsw' (a graph; cannot forget entries: tombstoned, rebuilt when a quarter is dead)
    knn_recompute: bool = True  # True: the reference (the newest token re-chooses values every position reads;
    # decoding recomputes the layers from the first memory layer up); False: causal, each token applies the
    # memory to its own attention only, mixing with its own query, so the ordinary KV cache applies
    knn_nlist: int = 0  # IVF lists; 0: about 4 * sqrt(entries), at most 1024 (default_nlist)
    knn_nprobe: int = 16  # IVF lists searched per query (where not tuned, see knn_tune)
    knn_pq_m: int = 8  # IVF-PQ sub-quantizers (must divide the head size)
    knn_dtype: str = "float32"  # storage of keys and values: 'float32', 'float16', 'bfloat16'
    knn_refine: int = 4  # approximate backends fetch k * knn_refine candidates and re-rank them with the stored keys
    knn_recall_target: float = 0.95  # recall@knn_recall_k vs exact search that tuned nprobe / efSearch must reach
    knn_recall_k: int = 5
    knn_recall_queries: int = 240  # stored keys searched (leave-one-out) to measure recall at build; 0: do not
    knn_hnsw_m: int = 32  # HNSW graph links per entry
    knn_ef_search: int = 64  # HNSW search breadth (where not tuned)
    knn_tune: str = "auto"  # 'auto': with knn_backend='auto', nprobe / efSearch (and the re-ranked candidates) are
    # tuned at build to the fewest reaching knn_recall_target; 'always': for any approximate backend; 'never': as set
    knn_mmap: bool = True  # load maps keys and values from the folder (read on first touch) instead of reading them
    knn_shard_block: int = 65536  # a sharded memory gives rank r the entries whose id // block % world == r
    knn_documents: int = 0  # >0: each row reads only the N stored documents its context matches best (every key
    # of the context votes for the document of its nearest stored key, at the first memory layer); 0: all of them

    def check(self, n_layer: int):
        if self.knn and len(self.knn) != n_layer:
            raise KNNMemoryError(f"knn has {len(self.knn)} entries but the model has {n_layer} layers: "
                               f"give one k per layer, e.g. knn={[0] * (n_layer - 1) + [5]}")
        if any(k < 0 for k in self.knn):
            raise KNNMemoryError(f"knn entries must be >= 0, got {self.knn}")
        if self.knn_documents < 0:
            raise KNNMemoryError(f"knn_documents={self.knn_documents} must be >= 0 (0: read every document)")
        for name, value, allowed in (("knn_query", self.knn_query, ("key", "query")),
                                     ("knn_metric", self.knn_metric, ("l2", "ip")),
                                     ("knn_backend", self.knn_backend, BACKENDS),
                                     ("knn_dtype", self.knn_dtype, KEY_DTYPES),
                                     ("knn_tune", self.knn_tune, ("auto", "always", "never"))):
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
# search backends: search(heads (M,), vecs (M, d), k) -> labels (M, k) of that head's entries (-1: none)

def exact_search(queries, keys, k: int, metric: str, sq_norms=None, n_valid=None):
    """Exact top-k: ids (G, M, k) of the keys (G, N, d) nearest each query (G, M, d) of its group,
    all groups in one batched matrix product. Groups are heads (TorchIndex) or (batch row, head)
    pairs (MemorizingMemory). n_valid (G,): only the first n_valid[g] keys of group g count."""
    return _exact_topk(queries, keys, k, metric, sq_norms, n_valid)[1]


def _exact_topk(queries, keys, k: int, metric: str, sq_norms=None, n_valid=None):
    """(scores, ids), each (G, M, k), of exact_search."""
    G, M, N = queries.size(0), queries.size(1), keys.size(1)
    if metric == "l2" and sq_norms is None:
        sq_norms = (keys * keys).sum(-1)  # (G, N)
    # on CPU, groups at a time whose scores fit in cache: scoring and top-k then stream through it once
    # (about 1.6x faster than one bmm + topk over 32 x 128 x 16k scores); on GPU, all at once
    step = G if keys.is_cuda else max(1, (1 << 21) // max(1, M * N))
    scores_out, ids_out = [], []
    for g in range(0, G, step):
        q, kk = queries[g:g + step], keys[g:g + step]
        if metric == "l2":  # -||q - k||^2 up to the query's own norm, which does not change the ranking
            scores = torch.baddbmm(-sq_norms[g:g + step, None, :], q, kk.transpose(1, 2), alpha=2)
        else:
            scores = torch.bmm(q, kk.transpose(1, 2))  # (g, M, N)
        if n_valid is not None:
            empty = torch.arange(N, device=keys.device) >= n_valid[g:g + step, None]  # (g, N)
            scores = scores.masked_fill(empty[:, None, :], float("-inf"))
        top = scores.topk(k, dim=-1)
        scores_out.append(top.values)
        ids_out.append(top.indices)
    cat = lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs)
    return cat(scores_out), cat(ids_out)


def _pad_by_head(heads, vecs, H):
    """Queries of each head side by side, padded to the busiest head: (H, Mmax, d), and where each went."""
    counts = torch.bincount(heads, minlength=H)
    order = torch.argsort(heads, stable=True)
    sorted_heads = heads[order]
    slot = torch.arange(len(heads), device=heads.device) - (torch.cumsum(counts, 0) - counts)[sorted_heads]
    padded = vecs.new_zeros(H, int(counts.max()), vecs.size(-1))
    padded[sorted_heads, slot] = vecs[order]
    return padded, order, sorted_heads, slot


class TorchIndex:
    """Exact search by one batched matrix product over all heads plus top-k (CPU or CUDA). Keys of
    up to STREAM_BYTES as float32 are copied once; larger ones (half precision, memory-mapped) are
    streamed in chunks of entries, so exact search works at any size (at the speed of reading them)."""
    exact, labels_are_positions = True, True
    STREAM_BYTES = 1 << 28
    CHUNK = 1 << 16

    def __init__(self, keys, metric: str, device=None):
        self.metric = metric
        H, N, d = keys.shape
        self.stream = N * H * d * 4 > self.STREAM_BYTES
        if self.stream:
            self.keys, self.sq_norms = keys, None  # (H, N, d) in its storage dtype, read chunk by chunk
        else:
            self.keys = keys.float().contiguous().to(device or keys.device)  # (H, N, d)
            self.sq_norms = (self.keys * self.keys).sum(-1) if metric == "l2" else None  # (H, N)

    def search(self, heads, vecs, k):
        H, N = self.keys.size(0), self.keys.size(1)
        padded, order, sorted_heads, slot = _pad_by_head(heads, vecs.float(), H)
        if not self.stream:
            ids = exact_search(padded.to(self.keys.device), self.keys, k, self.metric, self.sq_norms)
        else:
            best_s = best_i = None
            for s in range(0, N, self.CHUNK):
                kc = self.keys[:, s:s + self.CHUNK].float().contiguous()
                sc, ic = _exact_topk(padded, kc, min(k, kc.size(1)), self.metric)
                ic = ic + s
                if best_s is not None:
                    sc, ic = torch.cat([best_s, sc], -1), torch.cat([best_i, ic], -1)
                top = sc.topk(min(k, sc.size(-1)), dim=-1)
                best_s, best_i = top.values, ic.gather(-1, top.indices)
            ids = best_i
        out = torch.empty(len(heads), k, dtype=torch.long, device=heads.device)
        out[order] = ids[sorted_heads, slot].to(heads.device)
        return out

    def bytes_per_entry(self):
        return 0 if self.stream else 4 * self.keys.size(-1) + 4 * (self.metric == "l2")


FAISS_KINDS = {  # backend -> faiss index factory string ({nlist}, {pq_m}, {m} filled in); all hold their own codes
    "faiss-flat": "IDMap2,Flat",
    "faiss-fp16": "IDMap2,SQfp16",
    "faiss-sq8": "IDMap2,SQ8",
    "faiss-ivf": "IVF{nlist},Flat",
    "faiss-ivfsq8": "IVF{nlist},SQ8",
    "faiss-ivfpq": "IVF{nlist},PQ{pq_m}",
    "faiss-ivfpqfs": "IVF{nlist},PQ{half}x4fs",
    "faiss-hnsw": "IDMap2,HNSW{m}",
}
EXACT_BACKENDS = ("torch", "faiss-flat")


def default_nlist(n: int) -> int:
    """IVF lists: about 4 * sqrt(entries), at most 1024: k-means over more lists costs minutes per head on
    a CPU (train and assignment are O(nlist)), while 1024 lists keep a probe to ~0.1% of a 1M memory."""
    return max(1, min(1024, int(4 * math.sqrt(n))))


class FaissIndex:
    """One faiss index per head (faiss searches one database per call), labelled by the memory's
    stable entry ids so that entries can be added and forgotten without renumbering. Flat is exact;
    SQ8/fp16 scan every key in 8/16 bits; IVF (Flat, SQ8, PQ, PQ fast-scan) probes nprobe of nlist
    k-means lists; HNSW walks a graph. Forgetting: IVF and the flat and SQ kinds remove the ids;
    HNSW cannot remove vectors, so the memory tombstones them (filters them out of results) and
    rebuilds the graph once a quarter of it is dead. On CUDA with faiss-gpu the indexes live on
    the GPU (the kinds faiss-gpu has)."""
    labels_are_positions = False

    def __init__(self, keys, metric: str, kind: str, nlist: int, nprobe: int, pq_m: int, indexes=None, ids=None,
                 hnsw_m: int = 32, ef_search: int = 64):
        import faiss
        # faiss's OpenMP pool and torch's would otherwise both spin up to all cores and fight
        faiss.omp_set_num_threads(torch.get_num_threads())
        self.faiss, self.kind, self.metric = faiss, kind, metric
        self.exact = kind == "faiss-flat"
        H, N, d = keys.shape
        self.device = keys.device
        self.nlist = (nlist or default_nlist(N)) if kind.startswith("faiss-ivf") else 0
        if indexes is None:
            if self.nlist and N < self.nlist:
                raise KNNMemoryError(f"{kind} with {self.nlist} lists needs at least that many entries, the memory "
                                     f"has {N}: lower knn_nlist or use knn_backend='torch' for small memories")
            if kind == "faiss-ivfpq" and d % pq_m:
                raise KNNMemoryError(f"knn_pq_m={pq_m} must divide the head size {d}")
            ids = torch.arange(N) if ids is None else ids
            indexes = self._build(keys, ids, metric, kind, pq_m, hnsw_m)
        self.trained_count = N
        if keys.is_cuda and hasattr(faiss, "StandardGpuResources"):
            self.res = faiss.StandardGpuResources()
            indexes = [faiss.index_cpu_to_gpu(self.res, keys.device.index or 0, ix) for ix in indexes]
        self.indexes = indexes
        self.refine = 1  # candidates fetched per neighbour asked, re-ranked exactly (KNNMemory sets knn_refine)
        self.set_probe(nprobe, ef_search)

    def set_probe(self, nprobe: int, ef_search: int):
        """IVF: lists probed per query; HNSW: the search's candidate-list length (efSearch)."""
        self.nprobe, self.ef_search = (min(nprobe, self.nlist) if self.nlist else 0), ef_search
        for index in self.indexes:
            ivf = self.faiss.try_extract_index_ivf(index) if self.nlist else None
            if ivf is not None:
                ivf.nprobe = self.nprobe
            if self.kind == "faiss-hnsw":
                self.faiss.downcast_index(index.index).hnsw.efSearch = ef_search

    def _build(self, keys, ids, metric, kind, pq_m, hnsw_m):
        faiss = self.faiss
        H, N, d = keys.shape
        mt = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        spec = FAISS_KINDS[kind].format(nlist=self.nlist, pq_m=pq_m, half=max(1, d // 2), m=hnsw_m)
        indexes = [faiss.index_factory(d, spec, mt) for _ in range(H)]
        if not indexes[0].is_trained:
            # faiss's k-means wants ~39 points per centroid; train on a sample of the keys (10 iterations)
            n_train = min(N, 40 * max(self.nlist, 256))
            rows = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:n_train].sort().values
            sample = keys[:, rows]  # (H, n_train, d): one pass over the rows for all heads
            for h, index in enumerate(indexes):
                ivf = faiss.try_extract_index_ivf(index)
                if ivf is not None:
                    ivf.cp.niter = 10
                    ivf.quantizer_trains_alone = 0
                    pq = faiss.downcast_index(ivf)
                    if isinstance(pq, faiss.IndexIVFPQ):
                        pq.do_polysemous_training = False
                        pq.pq.cp.niter = 10  # the factory's default: minutes of annealing, unused here
                index.train(_as_f32(sample[h]))
        self.indexes = indexes
        self.add(keys, ids)
        return indexes

    def _writable(self):
        """Indexes mapped from files (read_index with IO_FLAG_MMAP: IVF lists stay on disk) are read-only:
        read them into RAM before the first change (faiss would abort the process otherwise)."""
        if getattr(self, "files", None):
            self.indexes = [self.faiss.read_index(f) for f in self.files]
            self.files = None
            self.set_probe(self.nprobe, self.ef_search)

    def add(self, keys, ids, chunk=1 << 16):
        """New entries: keys (H, m, d), their stable ids (m,); read chunk by chunk of entries, all heads at
        once (keys are stored entry-major: one pass over a memory-mapped file)."""
        self._writable()
        if keys.size(1) < 4096:  # a few new entries: threads only wait for each other (see KNNMemory.search)
            with one_thread():
                return self._add_chunks(keys, ids, chunk)
        self._add_chunks(keys, ids, chunk)

    def _add_chunks(self, keys, ids, chunk):
        for s in range(0, keys.size(1), chunk):
            part = keys[:, s:s + chunk].float().contiguous()
            ids_np = ids[s:s + chunk].numpy().astype("int64")
            for h, index in enumerate(self.indexes):
                index.add_with_ids(np.ascontiguousarray(part[h].numpy()), ids_np)

    def remove(self, ids) -> bool:
        """Forget entries by id; False where the kind cannot (HNSW: the memory tombstones them)."""
        if self.kind == "faiss-hnsw":
            return False
        self._writable()
        sel = self.faiss.IDSelectorBatch(ids.numpy().astype("int64"))
        for index in self.indexes:
            index.remove_ids(sel)
        return True

    @property
    def ntotal(self):
        return self.indexes[0].ntotal

    def search(self, heads, vecs, k):
        out = torch.empty(len(heads), k, dtype=torch.long)
        heads_cpu, vecs_cpu = heads.cpu(), vecs.float().cpu().numpy()
        for h in torch.unique(heads_cpu).tolist():
            rows = (heads_cpu == h).nonzero().squeeze(1)
            _, ids = self.indexes[h].search(vecs_cpu[rows.numpy()], k)
            out[rows] = torch.from_numpy(ids).long()
        return out.to(heads.device)

    def bytes_per_entry(self):
        """Bytes of the index per entry and head (codes, ids, graph links; centroids amortized)."""
        faiss = self.faiss
        ix = self.indexes[0]
        if "Gpu" in type(ix).__name__:
            return float("nan")
        if getattr(self, "files", None):  # mapped: its lists are in the file
            return os.path.getsize(self.files[0]) / max(1, ix.ntotal)
        return len(faiss.serialize_index(ix)) / max(1, ix.ntotal)

    def to_cpu(self, h):
        ix = self.indexes[h]
        if hasattr(self.faiss, "index_gpu_to_cpu") and "Gpu" in type(ix).__name__:
            return self.faiss.index_gpu_to_cpu(ix)
        return ix


def _as_f32(x):
    """float32 C-contiguous numpy rows for faiss (from any storage dtype, in RAM or mapped)."""
    return np.ascontiguousarray(x.float().cpu().numpy())


def keys_fingerprint(keys, ids) -> str:
    """A hash of what an index was built over: the entry count, and 64 evenly spaced keys of every
    head with their ids (reads 64 rows, cheap on a memory-mapped memory)."""
    H, N, d = keys.shape
    h = hashlib.sha256(f"{H},{N},{d}".encode())
    rows = torch.linspace(0, max(0, N - 1), min(N, 64)).long() if N else torch.zeros(0, dtype=torch.long)
    h.update(ids[rows].numpy().astype("<i8").tobytes())
    h.update(keys[:, rows].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def file_checksum(path: str) -> str:
    """sha256 of a file's size, its first and last MiB and 16 evenly spaced 4 KiB blocks: tells one index
    file from another without reading gigabytes."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for pos in [0, max(0, size - (1 << 20))] + [size * i // 17 for i in range(1, 17)]:
            f.seek(pos)
            h.update(f.read(1 << 20 if pos in (0, max(0, size - (1 << 20))) else 4096))
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# storage: the rows (N, H, d) of one array, growable, in RAM or in a .npy file mapped into memory

STORAGE_DTYPES = {"float32": (torch.float32, "<f4"), "float16": (torch.float16, "<f2"),
                  "bfloat16": (torch.bfloat16, "<u2"),  # numpy has no bfloat16: its bits are kept as uint16
                  "int64": (torch.int64, "<i8")}  # entry and document ids
KEY_DTYPES = ("float32", "float16", "bfloat16")  # knn_dtype: the storage of keys and values
NPY_HEADER = 128  # bytes: a fixed-size .npy header, so that a file on disk can grow and be re-headed in place


def _npy_header(shape, descr) -> bytes:
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    return b"\x93NUMPY\x01\x00" + (NPY_HEADER - 10).to_bytes(2, "little") + text.ljust(NPY_HEADER - 11) + b"\n"


class Column:
    """One growable array of rows (N, *row) in one of three places:
    - RAM: a torch buffer that grows by half its size (amortized O(1) appends);
    - on disk (`path`, writable): a .npy file mapped into memory that grows the same way, for memories
      larger than RAM; its header is rewritten with the row count by flush();
    - mapped read-only from a saved folder (`source`): opens in milliseconds, and only the pages a
      search touches are read; its first change copies it into RAM (open large memories to read)."""

    def __init__(self, row: tuple, dtype: str, path: str | None = None, data=None, n: int = 0,
                 source: str | None = None):
        self.row, self.dtype, self.path, self.source, self.n = tuple(row), dtype, path, source, n
        self.torch_dtype, self.descr = STORAGE_DTYPES[dtype]
        self.buf = data if data is not None else self._alloc(0)

    def _alloc(self, cap):
        if self.path is None:
            return torch.empty((cap,) + self.row, dtype=self.torch_dtype)
        with open(self.path, "r+b" if os.path.exists(self.path) else "w+b") as f:
            f.write(_npy_header((self.n,) + self.row, self.descr))
            f.truncate(NPY_HEADER + cap * math.prod(self.row) * np.dtype(self.descr).itemsize)
        if cap == 0:
            return torch.empty((0,) + self.row, dtype=self.torch_dtype)
        self._map = np.memmap(self.path, dtype=self.descr, mode="r+", offset=NPY_HEADER, shape=(cap,) + self.row)
        return _from_numpy(self._map, self.torch_dtype)

    def view(self):
        return self.buf[: self.n]  # (n, *row)

    def rows(self, pos, heads):
        """buf[pos, heads[:, None]] for a (N, H, d) column, pos (M, k), heads (M,): (M, k, d). One index_select
        on the flattened buffer: advanced indexing over two dimensions is ~8x slower on CPU, and this gather
        is the largest cost of a search re-ranked from 100k entries."""
        H, d = self.buf.size(1), self.buf.size(-1)
        flat = (pos * H + heads[:, None]).reshape(-1)
        return self.buf.view(-1, d).index_select(0, flat).view(*pos.shape, d)

    def _own(self):
        if self.source is not None:  # mapped read-only: copy into RAM before the first change
            self.buf, self.source = self.view().clone(), None

    def append(self, x):
        self._own()
        m = x.size(0)
        if self.n + m > self.buf.size(0):
            old = self.buf
            new = self._alloc(max(self.n + m, self.buf.size(0) * 3 // 2, 1024))  # a mapping stays valid while viewed
            new[: self.n] = old[: self.n]
            self.buf = new
        self.buf[self.n: self.n + m] = x.to(self.torch_dtype)
        self.n += m

    def reserve(self, n: int):
        """Room for n rows without growing (a large memory built in steps: no copy on the way)."""
        self._own()
        if n > self.buf.size(0):
            old, new = self.buf, self._alloc(n)
            new[: self.n] = old[: self.n]
            self.buf = new

    def keep(self, mask):
        """Drop the rows where mask is False, keeping the order (in place, chunk by chunk)."""
        self._own()
        idx = mask.nonzero().squeeze(1)
        for s in range(0, idx.numel(), 1 << 16):
            part = idx[s:s + (1 << 16)]  # part[i] >= s + i: no row still to be read is overwritten
            self.buf[s:s + part.numel()] = self.buf[part]
        self.n = idx.numel()

    def flush(self):
        """A file on disk: its header says n rows (rows past n are spare capacity), its pages are on disk."""
        if self.path is not None:
            if getattr(self, "_map", None) is not None:
                self._map.flush()
            with open(self.path, "r+b") as f:
                f.write(_npy_header((self.n,) + self.row, self.descr))
                os.fsync(f.fileno())

    def save(self, path: str):
        """Exactly these n rows as the .npy file `path` (a hard link when unchanged since opened)."""
        if self.source is not None:
            return _link_or_copy(self.source, path)
        with open(path, "wb") as f:
            f.write(_npy_header((self.n,) + self.row, self.descr))
            for s in range(0, self.n, 1 << 16):
                f.write(_to_numpy(self.buf[s:min(self.n, s + (1 << 16))].contiguous()).tobytes())

    @classmethod
    def open(cls, path: str, dtype: str, row: tuple, n: int, mmap: bool) -> "Column":
        """The first n rows of a .npy file; mmap: mapped read-only (pages read on first touch)."""
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise KNNMemoryError(f"{path} is missing or corrupt ({e}); rebuild the memory") from None
        if arr.dtype != np.dtype(STORAGE_DTYPES[dtype][1]) or tuple(arr.shape[1:]) != tuple(row) or arr.shape[0] < n:
            raise KNNMemoryError(f"{path} holds {arr.dtype} {arr.shape}, the manifest says {dtype} with {n} rows "
                                 f"of {row}: the folder is damaged, rebuild the memory")
        if mmap and arr.shape[0] != n:
            arr = arr[:n]
        data = _from_numpy(arr[:n] if not mmap else arr, STORAGE_DTYPES[dtype][0])
        return cls(row, dtype, data=data, n=n, source=path if mmap else None)


class IdColumn:
    """A (N,) int64 attribute of a KNNMemory kept in a growable Column (attribute _<name>): reading gives
    its rows, assigning a tensor replaces them."""

    def __set_name__(self, owner, name):
        self.column = "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.column).view()

    def __set__(self, obj, t):
        setattr(obj, self.column, Column((), "int64", data=t.long().clone(), n=t.numel()))


def _from_numpy(arr, torch_dtype):
    import warnings
    with warnings.catch_warnings():  # a read-only map: torch warns that it is not writable; nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t.view(torch_dtype) if t.dtype != torch_dtype else t


def _to_numpy(t):
    return t.view(torch.int16).numpy().view("<u2") if t.dtype == torch.bfloat16 else t.numpy()


# -----------------------------------------------------------------------------

class KNNMemory:
    """Keys and values of memory texts per (layer, head), their documents, and search indexes.

    Storage: per memory layer one Column of keys (N, H, d) and one of values (N, H, dv) in
    knn_dtype, in RAM, on disk (storage_dir: built straight into a folder, for memories larger than
    RAM) or mapped read-only from a saved folder (load with knn_mmap). Every entry has a stable id
    (entry_ids, increasing) that indexes are labelled with, so adding and forgetting never renumber
    an index. A sharded memory (shard=(rank, world)) keeps only the entries whose id falls in its
    blocks of knn_shard_block ids; search() then merges every rank's top k (torch.distributed)."""
    KIND = "knn-attention-memory"  # the manifest's kind; KNNLMDatastore keeps the same folder format
    doc_ids = IdColumn()  # (N,) the document of every entry
    selection = None  # with knn_documents: per batch row, the positions of the entries its context chose
    entry_ids = IdColumn()  # (N,) stable, increasing ids

    def __init__(self, settings: KNNSettings, layers: list[int], n_head: int, head_size: int, fingerprint: str,
                 tokenizer: dict, bookkeeping_token: int, device="cpu", value_size: int | None = None,
                 storage_dir: str | None = None, shard: tuple[int, int] | None = None):
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
        self.dtype = settings.knn_dtype
        self.storage_dir = os.path.abspath(storage_dir) if storage_dir else None
        if self.storage_dir:
            os.makedirs(self.storage_dir, exist_ok=True)
        where = lambda name: os.path.join(self.storage_dir, name) if self.storage_dir else None
        self._keys = {L: Column((n_head, head_size), self.dtype, where(f"keys.{L}.npy")) for L in self.layers}
        self._values = {L: Column((n_head, self.value_size), self.dtype, where(f"values.{L}.npy")) for L in self.layers}
        self.doc_ids = self.entry_ids = torch.zeros(0, dtype=torch.long)
        self.next_id = 0  # the id of the next entry added (all ranks count every entry)
        self.total = 0  # entries in the whole memory (all shards)
        self.documents: list[dict] = []  # {"id", "source", "text", "n_tokens"}
        self.shard = tuple(shard) if shard else None  # (rank, world)
        self._indexes: dict = {}  # layer -> index, built lazily, then kept up to date by adds and removes
        self.index_info: dict = {}  # layer -> {backend, nlist, nprobe, recall_at_k, ...} of the built index
        self._dead: dict = {}  # layer -> entries forgotten but still in an HNSW graph (tombstones)

    def __len__(self):
        return self.total

    @property
    def local_count(self) -> int:
        return self.entry_ids.numel()

    @property
    def keys(self) -> dict:
        """layer -> keys (H, N, d) of this shard, a view of the storage (its dtype; maybe memory-mapped)."""
        return {L: c.view().permute(1, 0, 2) for L, c in self._keys.items()}

    @property
    def values(self) -> dict:
        return {L: c.view().permute(1, 0, 2) for L, c in self._values.items()}

    @classmethod
    def create(cls, model, settings: KNNSettings, tokenizer_meta: dict, tokenizer, storage_dir: str | None = None):
        settings.check(model.config.n_layer)
        if not settings.layers:
            raise KNNMemoryError("knn selects no layer: set knn to one k per layer, e.g. knn=[0, 0, 5, 0]")
        bk = tokenizer.encode("\n")
        if len(bk) != 1:
            raise KNNMemoryError("the tokenizer has no single-token '\\n' to use as the bookkeeping token")
        cfg = model.config
        # one store per key/value head (grouped-query attention: n_kv_head < n_head), shared by its query heads
        return cls(settings, settings.layers, cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head,
                   model_fingerprint(model), tokenizer_meta, bk[0], device=next(model.parameters()).device,
                   storage_dir=storage_dir)

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

    def _mine(self, ids):
        """Which of these entry ids this shard keeps (all of them when unsharded)."""
        if self.shard is None:
            return torch.ones(ids.numel(), dtype=torch.bool)
        rank, world = self.shard
        return (ids // self.settings.knn_shard_block) % world == rank

    def add_entries(self, keys: dict, values: dict, source: str = "", text: str = "") -> int:
        """Append one document's entries: keys[L], values[L] of shape (H, n, d) per memory layer (a
        sharded memory keeps its share). Indexes already built take the new entries in (IVF assigns
        them to their lists, nothing is retrained), so growing a large memory costs only the new entries."""
        n = keys[self.layers[0]].size(1)
        for L in self.layers:
            if keys[L].shape != (self.n_head, n, self.head_size) or values[L].shape != (self.n_head, n, self.value_size):
                raise KNNMemoryError(f"layer {L}: keys must be ({self.n_head}, {n}, {self.head_size}) and values "
                                     f"({self.n_head}, {n}, {self.value_size})")
        ids = torch.arange(self.next_id, self.next_id + n)
        mine = self._mine(ids)
        sel = mine.nonzero().squeeze(1) if self.shard else None
        doc_id = max((d["id"] for d in self.documents), default=-1) + 1
        before = self.local_count
        for L in self.layers:
            k, v = keys[L].detach().cpu(), values[L].detach().cpu()
            if sel is not None:
                k, v = k[:, sel], v[:, sel]
            self._keys[L].append(k.transpose(0, 1))
            self._values[L].append(v.transpose(0, 1))
        self._entry_ids.append(ids[mine])
        self._doc_ids.append(torch.full((int(mine.sum()),), doc_id, dtype=torch.long))
        self.next_id += n
        self.total += n
        self.documents.append({"id": doc_id, "source": source, "text": text, "n_tokens": n})
        for L in list(self._indexes):
            index = self._indexes[L]
            if isinstance(index, FaissIndex) and index.kind == self.backend and self.local_count <= 4 * index.trained_count:
                index.add(self.keys[L][:, before:], self.entry_ids[before:])
                self.index_info.get(L, {}).pop("recall_at_k", None)  # measured on fewer entries
            else:
                self._drop_index(L)  # rebuilt on the next search (exact ones: cheap; IVF: retrained for its size)
        return doc_id

    def reserve(self, n: int):
        """Room for n entries in every column (growing a large memory then copies nothing)."""
        for c in [self._doc_ids, self._entry_ids] + list(self._keys.values()) + list(self._values.values()):
            c.reserve(n)

    def add_text(self, model, tokenizer, text: str, source: str = "") -> int:
        return self.add_tokens(model, tokenizer.encode(text), source=source, text=text)

    def remove(self, doc_id: int):
        """Forget a document. Storage is compacted; IVF and flat indexes remove the ids; an HNSW graph
        cannot, so its entries are tombstoned (filtered from results) until a quarter is dead, then rebuilt."""
        if not any(d["id"] == doc_id for d in self.documents):
            raise KNNMemoryError(f"no document {doc_id} in the memory (documents: {[d['id'] for d in self.documents]})")
        keep = self.doc_ids != doc_id
        gone = self.entry_ids[~keep]
        for L in self.layers:
            self._keys[L].keep(keep)
            self._values[L].keep(keep)
        self._doc_ids.keep(keep)
        self._entry_ids.keep(keep)
        self.total -= next(d["n_tokens"] for d in self.documents if d["id"] == doc_id)
        self.documents = [d for d in self.documents if d["id"] != doc_id]
        for L in list(self._indexes):
            index = self._indexes[L]
            if isinstance(index, FaissIndex) and index.kind == self.backend:
                if not index.remove(gone):
                    self._dead[L] = self._dead.get(L, 0) + gone.numel()
                    if self._dead[L] * 4 <= index.ntotal:
                        continue
                else:
                    continue
            self._drop_index(L)

    def clear(self):
        for doc in list(self.documents):
            self.remove(doc["id"])

    def _drop_index(self, L):
        self._indexes.pop(L, None)
        self.index_info.pop(L, None)
        self._dead.pop(L, None)

    # -- search ----------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The search backend in use. 'auto' picks by this shard's size (docs/knn-scale.md has the
        measurements): below AUTO_FAISS_FROM entries torch's matmul; then, below AUTO_IVF_FROM, exact
        faiss-flat on CPU when only position 0 can be chosen (mem_frac=0: one query per head and row), else
        torch; from AUTO_IVF_FROM IVF-SQ8 and from AUTO_PQ_FROM IVF-PQ fast-scan (4-bit codes), both
        re-ranked exactly with the stored keys, their nprobe tuned to knn_recall_target at build time."""
        s = self.settings
        if s.knn_backend != "auto":
            return s.knn_backend
        n = self.local_count
        if n >= AUTO_PQ_FROM:
            return "faiss-ivfpqfs"
        if n >= AUTO_IVF_FROM:
            return "faiss-ivfsq8"
        few_queries = s.mem_frac == 0
        return "faiss-flat" if self.device.type == "cpu" and few_queries and n >= AUTO_FAISS_FROM else "torch"

    def index(self, layer: int):
        """The search index of a layer, built (and, for approximate ones, measured) on first use."""
        if layer not in self._indexes:
            s, backend = self.settings, self.backend
            if backend == "torch":
                self._indexes[layer] = TorchIndex(self.keys[layer], s.knn_metric, self.device)
                self.index_info[layer] = {"backend": backend, "count": self.local_count}
            else:
                t0 = time.perf_counter()
                self._indexes[layer] = FaissIndex(self.keys[layer], s.knn_metric, backend, s.knn_nlist,
                                                  max(1, s.knn_nprobe), s.knn_pq_m, ids=self.entry_ids,
                                                  hnsw_m=s.knn_hnsw_m, ef_search=max(1, s.knn_ef_search))
                self._indexes[layer].refine = max(1, s.knn_refine)
                self.index_info[layer] = {"backend": backend, "count": self.local_count,
                                          "build_s": time.perf_counter() - t0}
                self.measure(layer)
        return self._indexes[layer]

    def measure(self, layer: int, k: int | None = None, queries: int | None = None, seed: int = 0) -> dict:
        """Recall@k of the layer's approximate index against exact search, on `queries` stored keys
        (leave-one-out: each query's own entry is dropped from both answers), and where tuned (knn_tune) the
        smallest nprobe / efSearch (1, 2, 4, ... / 16, 32, ...) whose recall reaches knn_recall_target.
        Where even that falls short (coarse PQ codes) the re-ranked candidates (knn_refine) double until it
        reaches it or 64x. Kept in index_info (and the manifest)."""
        s = self.settings
        index = self._indexes.get(layer) or self.index(layer)
        info = self.index_info[layer]
        k = k or s.knn_recall_k
        queries = s.knn_recall_queries if queries is None else queries
        if getattr(index, "exact", False) or queries <= 0 or self.local_count <= k + 1:
            return info
        heads, rows = recall_sample(self.local_count, self.n_head, queries, seed)
        vecs = self._keys[layer].buf[rows, heads].float()
        own = self.entry_ids[rows]
        truth = TorchIndex(self.keys[layer], s.knn_metric).search(heads, vecs, k + 1)
        truth = _drop_own(self.entry_ids[truth], own, k)

        def recall(nprobe, ef):
            index.set_probe(nprobe, ef)
            got = _drop_own(self._local_search(layer, heads, vecs, k + 1)[1], own, k)
            return recall_at_k(got, truth)

        nprobe, ef = max(1, s.knn_nprobe), max(1, s.knn_ef_search)
        tune = s.knn_tune == "always" or (s.knn_tune == "auto" and s.knn_backend == "auto")
        if tune and index.kind == "faiss-hnsw":
            ef = _tune(lambda e: recall(0, e), [16, 32, 64, 128, 256, 512], s.knn_recall_target)
        elif tune and index.nlist:
            nprobe = _tune(lambda p: recall(p, 0), [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
                                                    if p < index.nlist] + [index.nlist], s.knn_recall_target)
        r = recall(nprobe, ef)
        while tune and r < s.knn_recall_target and index.refine < 64:
            index.refine *= 2  # the codes rank too coarsely (PQ): re-rank more candidates with the stored keys
            r = recall(nprobe, ef)
        info.update({"nlist": index.nlist, "nprobe": index.nprobe, "ef_search": index.ef_search if
                     index.kind == "faiss-hnsw" else None, "refine": index.refine, "recall_at_k": r, "recall_k": k,
                     "recall_queries": queries, "recall_seed": seed, "count": self.local_count})
        return info

    def _local_search(self, layer, heads, vecs, k):
        """This shard's k nearest entries of every probe, re-scored exactly with the stored keys:
        (scores (M, k) descending, ids (M, k) stable entry ids, positions (M, k)); -inf / -1 pad."""
        heads, vecs = heads.cpu(), vecs.detach().float().cpu()
        M, n = heads.numel(), self.local_count
        scores = torch.full((M, k), float("-inf"))
        pos = torch.full((M, k), -1, dtype=torch.long)
        if n == 0 or M == 0:
            return scores, pos.clone(), pos
        index = self.index(layer)
        kc = min(n if index.labels_are_positions else index.ntotal,
                 k if getattr(index, "exact", False) else k * index.refine + self._dead.get(layer, 0))
        labels = index.search(heads, vecs, kc).cpu()
        ids = self.entry_ids
        if index.labels_are_positions:
            p = labels
        elif ids[-1] - ids[0] == n - 1:  # nothing forgotten (ids are a range): position = id - first id
            p = labels - ids[0]
            p = torch.where((labels >= 0) & (p < n), p, torch.full_like(p, -1))
        else:  # stable ids -> positions; ids no longer stored (HNSW tombstones) and faiss's -1 drop out
            p = torch.searchsorted(ids, labels).clamp(max=n - 1)
            p = torch.where((labels >= 0) & (ids[p] == labels), p, torch.full_like(p, -1))
        if getattr(index, "exact", False) and self.shard is None and kc == k:
            # exact, unsharded: the index's own order is the answer; scores are needed only to merge shards
            return None, ids[p], p
        cand = self._keys[layer].rows(p.clamp(min=0), heads).float()  # (M, kc, d)
        if self.settings.knn_metric == "l2":
            sc = -((cand - vecs[:, None]) ** 2).sum(-1)
        else:
            sc = (cand * vecs[:, None]).sum(-1)
        sc = sc.masked_fill(p < 0, float("-inf"))
        gid = torch.where(p >= 0, self.entry_ids[p.clamp(min=0)], torch.full_like(p, 1 << 62))
        sc, gid, p = _rank(sc, gid, p, k)
        scores[:, :sc.size(1)], pos[:, :p.size(1)] = sc, p
        ids = torch.where(pos >= 0, self.entry_ids[pos.clamp(min=0)], torch.full_like(pos, -1))
        return scores, ids, pos

    def search(self, layer: int, heads, vecs, k: int):
        """The k memory entries nearest each probe vecs[m] (M, d) among head heads[m]'s entries at
        `layer`: (keys (M, k, d), values (M, k, dv), ids (M, k)), nearest first, float32 on the
        memory's device. Exact or approximate per the backend; approximate ones fetch k * knn_refine
        candidates and re-rank them with the stored keys. A sharded memory is searched by every rank
        (all ranks call search with the same probes, as ranks generating in lockstep do): each takes
        its shard's top k and the global top k is merged from all_gather of scores, ids, keys, values
        (an exact search re-scores its candidates with the stored keys only then).
        Runs on one CPU thread: its operations are small, and with two threads every one of them waits for
        both (140 ms instead of 0.35 ms per call, measured on a 2-core machine shared with other jobs)."""
        with one_thread():
            return self._search(layer, heads, vecs, k)

    def _search(self, layer, heads, vecs, k):
        scores, ids, pos = self._local_search(layer, heads, vecs, k)
        if self.local_count:
            h, p = heads.cpu(), pos.clamp(min=0)
            ck = self._keys[layer].rows(p, h).float()  # (M, k, d)
            cv = self._values[layer].rows(p, h).float()
        else:  # an empty shard: only padding (score -inf), which the merge drops
            ck, cv = torch.zeros(*pos.shape, self.head_size), torch.zeros(*pos.shape, self.value_size)
        if self.shard is not None and self.shard[1] > 1:
            import torch.distributed as dist
            gathered = []
            for t in (scores, ids, ck, cv):
                out = [torch.empty_like(t) for _ in range(self.shard[1])]
                dist.all_gather(out, t.contiguous())
                gathered.append(torch.cat(out, 1))
            scores, ids, ck, cv = gathered
            key = torch.where(ids >= 0, ids, torch.full_like(ids, 1 << 62))
            scores, _, order = _rank(scores, key, torch.arange(scores.size(1)).expand_as(scores), k)
            rows = torch.arange(order.size(0))[:, None]
            ids, ck, cv = ids.gather(1, order), ck[rows, order], cv[rows, order]
        dev = self.device
        return ck.to(dev), cv.to(dev), ids.to(dev)

    # -- reading only some documents ---------------------------------------------

    def select_documents(self, layer: int, keys, n: int):
        """Set self.selection: for each row of a context's unrotated keys (B, H, T, d) at `layer`, the positions
        of the entries of the n documents it matches best (None: all of them). Every key votes for the document
        of its nearest stored key of the same head; ties go to the older document. Rare tokens (a name) find
        their twins in one document, common ones scatter their votes, so the document that shares the
        context's rare words wins."""
        B, H, T, d = keys.shape
        heads = torch.arange(H).repeat_interleave(T)
        selection = []
        for row in keys.detach().float().cpu():  # (H, T, d)
            with one_thread():
                _, _, pos = self._local_search(layer, heads, row.reshape(H * T, d), 1)
            docs = self.doc_ids[pos[pos >= 0]]
            votes = torch.bincount(docs, minlength=int(self.doc_ids.max()) + 1)
            order = torch.sort(votes, descending=True, stable=True).indices
            chosen = order[:n][votes[order[:n]] > 0]
            if len(chosen) == 0 or len(chosen) == len(self.documents):  # no key voted, or every document
                selection.append(None)  # won: the row searches the whole memory, through its index
            else:
                selection.append(torch.isin(self.doc_ids, chosen).nonzero().squeeze(1))
        self.selection = selection
        self._within = {}  # (layer, row) -> exact index over that row's selected entries, built on first use

    def search_within(self, layer: int, heads, vecs, k: int, row: int):
        """search() among the entries batch row `row` selected (select_documents) only: exact, the same search
        as a memory holding just those entries; (keys (M, k', d), values (M, k', dv), ids (M, k')) with
        k' = min(k, entries selected). The index is kept until the next selection: every generated token
        searches the same entries at every memory layer."""
        positions = self.selection[row]
        if (layer, row) not in self._within:
            self._within[layer, row] = TorchIndex(self._keys[layer].buf[positions].permute(1, 0, 2),
                                                  self.settings.knn_metric)
        index = self._within[layer, row]
        h = heads.cpu()
        pos = positions[index.search(h, vecs.detach().float().cpu(), min(k, len(positions)))]  # (M, k')
        dev = self.device
        return (self._keys[layer].rows(pos, h).float().to(dev), self._values[layer].rows(pos, h).float().to(dev),
                self.entry_ids[pos].to(dev))

    # -- the hook --------------------------------------------------------------

    def attach(self, model):
        """Plug into the model's attention at every layer with k > 0."""
        self._check_model(model)
        self.settings.check(model.config.n_layer)
        if self.settings.knn_documents and self.shard is not None:
            raise KNNMemoryError("knn_documents needs every document's entries on every process: use it with an "
                                 "unsharded memory (or knn_documents=0)")
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
            "n_head": self.n_head, "head_size": self.head_size, "value_size": self.value_size,
            "count": self.local_count, "total": self.total, "next_id": self.next_id, "dtype": self.dtype,
            "shard": None if self.shard is None else {"rank": self.shard[0], "world": self.shard[1],
                                                       "block": self.settings.knn_shard_block},
            "fingerprint": self.fingerprint, "tokenizer": self.tokenizer,
            "bookkeeping_token": self.bookkeeping_token, "remove_bookkeeping": self.remove_bookkeeping,
            "metric": self.settings.knn_metric, "backend": self.backend,
            "documents": self.documents, "indexes": {},
        }

    def save(self, path: str):
        """Write the memory folder: manifest.json, keys.L.npy and values.L.npy (N, H, d) in knn_dtype,
        doc_ids.npy, entry_ids.npy and one faiss index per layer and head whose checksum, and a
        fingerprint of the keys it indexes, the manifest records. A new folder is written beside the
        old one and swapped in by renames, so a crash leaves the previous memory (or path.old) intact;
        arrays unchanged since they were mapped from a folder are hard-linked, not copied. A memory
        built on disk (storage_dir=path) is saved in place, manifest last. Leftovers of a killed save
        (path.tmp, *.tmp files) are removed first."""
        import faiss
        path = os.path.abspath(path)
        tmp, old = path + ".tmp", path + ".old"
        in_place = self.storage_dir == path
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(path):
            for name in os.listdir(path):
                if name.endswith(".tmp"):
                    _remove(os.path.join(path, name))
        target = path if in_place else tmp
        os.makedirs(target, exist_ok=True)
        man = self.manifest()
        for L in self.layers:
            if in_place:
                self._keys[L].flush()
                self._values[L].flush()
            else:
                self._keys[L].save(os.path.join(target, f"keys.{L}.npy"))
                self._values[L].save(os.path.join(target, f"values.{L}.npy"))
        for name, t in (("doc_ids", self.doc_ids), ("entry_ids", self.entry_ids)):
            atomic_write(os.path.join(target, f"{name}.npy"), lambda f: np.save(f, t.numpy().astype("<i8")))
        written = set()
        if self.backend != "torch" and self.local_count:
            for L in self.layers:
                index = self.index(L)
                if "recall_at_k" not in self.index_info[L]:
                    self.measure(L)
                files = {}
                for h in range(self.n_head):
                    name = f"index.{L}.{h}.faiss"
                    dest = os.path.join(target, name)
                    src = index.files[h] if getattr(index, "files", None) else None
                    if src and os.path.abspath(src) != dest:  # mapped from a folder, unchanged: link (or copy) it
                        _link_or_copy(src, dest)
                    elif not src:
                        atomic_write(dest, lambda f: f.write(faiss.serialize_index(index.to_cpu(h))))
                    files[name] = [os.path.getsize(os.path.join(target, name)), file_checksum(os.path.join(target, name))]
                    written.add(name)
                man["indexes"][str(L)] = {**self.index_info[L], "keys": keys_fingerprint(self.keys[L], self.entry_ids),
                                          "dead": self._dead.get(L, 0), "files": files}
        if in_place:
            for name in os.listdir(path):
                if name.startswith("index.") and name.endswith(".faiss") and name not in written:
                    os.remove(os.path.join(path, name))  # an older backend's
        else:
            for name in os.listdir(tmp):
                with open(os.path.join(tmp, name), "rb") as f:
                    os.fsync(f.fileno())
        atomic_write(os.path.join(target, "manifest.json"), lambda f: json.dump(man, f, indent=1), "w")
        if not in_place:
            if os.path.exists(path):
                shutil.rmtree(old, ignore_errors=True)
                os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, path: str, model, settings: KNNSettings, force: bool = False,
             shard: tuple[int, int] | None = None) -> "KNNMemory":
        """Load a memory folder for `model`; refuses one built by other weights unless force. With
        settings.knn_mmap the keys and values stay on disk, mapped (opening a 10M-entry memory reads only
        its manifest, ids and index files). shard=(rank, world): keep only this rank's entries (see
        KNNMemory). Folders of format 1 (kv.safetensors) load too; their index files, which carry no
        fingerprint, are rebuilt from the keys."""
        path = os.path.abspath(path)
        if not os.path.isdir(path) and os.path.isdir(path + ".old"):
            path = path + ".old"  # a save was interrupted between its two renames
        man = read_manifest(path, cls.KIND)
        fp = model_fingerprint(model)
        if man["fingerprint"] != fp and not force:
            raise KNNMemoryError(f"{path} was built by another model (fingerprint {man['fingerprint']}, this model "
                               f"{fp}): its keys and values mean nothing here. Rebuild it from its texts with this "
                               "model, or pass memory_force=True to use it anyway")
        saved_shard = man.get("shard")
        if saved_shard and (shard is None or tuple(shard) != (saved_shard["rank"], saved_shard["world"])):
            raise KNNMemoryError(f"{path} holds shard {saved_shard['rank']} of {saved_shard['world']}: load it on that "
                                 f"rank with shard=({saved_shard['rank']}, {saved_shard['world']})")
        mem = cls(settings, man["layers"], man["n_head"], man["head_size"], man["fingerprint"], man["tokenizer"],
                  man["bookkeeping_token"], device=next(model.parameters()).device, value_size=man.get("value_size"))
        mem.remove_bookkeeping = man["remove_bookkeeping"]
        mem._check_model(model)
        mem.documents = man["documents"]
        n, H, d, dv = man["count"], man["n_head"], man["head_size"], mem.value_size
        # (format 1 folders had no shard, dtype, ids: all float32 entries, ids 0..N-1)
        if man["format_version"] == 1:
            mem._read_v1(path, man)
        else:
            mem.dtype = man["dtype"]
            for L in mem.layers:
                mem._keys[L] = Column.open(os.path.join(path, f"keys.{L}.npy"), mem.dtype, (H, d), n, settings.knn_mmap)
                mem._values[L] = Column.open(os.path.join(path, f"values.{L}.npy"), mem.dtype, (H, dv), n,
                                             settings.knn_mmap)
            for name in ("doc_ids", "entry_ids"):
                try:
                    arr = np.load(os.path.join(path, f"{name}.npy"), allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise KNNMemoryError(f"{path}/{name}.npy is missing or corrupt ({e}); rebuild the memory") from None
                if arr.shape != (n,):
                    raise KNNMemoryError(f"{path}/{name}.npy holds {arr.shape[0] if arr.ndim else 0} ids, the manifest "
                                         f"counts {n}: the folder is damaged, rebuild the memory")
                setattr(mem, name, torch.from_numpy(arr.astype(np.int64)))
            mem.next_id, mem.total = man["next_id"], man["total"]
        if saved_shard:
            mem.shard = tuple(shard)
            settings.knn_shard_block = saved_shard["block"]
        elif shard is not None:
            mem._take_shard(tuple(shard))  # the saved indexes cover every entry: this shard builds its own
            return mem
        if man["format_version"] >= 2:
            mem._read_indexes(path, man)
        return mem

    def _read_v1(self, path, man):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            tensors = load_file(os.path.join(path, "kv.safetensors"))
        except (SafetensorError, OSError, ValueError) as e:
            raise KNNMemoryError(f"{path}/kv.safetensors is missing or corrupt ({e}); rebuild the memory") from None
        shape = (man["n_head"], man["count"], man["head_size"])
        for L in self.layers:
            k, v = tensors.get(f"keys.{L}"), tensors.get(f"values.{L}")
            if k is None or v is None or tuple(k.shape) != shape or tuple(v.shape) != shape[:2] + (self.value_size,):
                raise KNNMemoryError(f"{path}: tensors of layer {L} are missing or not of shape {shape}; "
                                   "the folder is damaged, rebuild the memory")
            self._keys[L] = Column(shape[::2], "float32")
            self._values[L] = Column((shape[0], self.value_size), "float32")
            self._keys[L].append(k.transpose(0, 1))
            self._values[L].append(v.transpose(0, 1))
        self.dtype = "float32"
        self.doc_ids = tensors["doc_ids"].long()
        self.entry_ids = torch.arange(man["count"])
        self.next_id = self.total = man["count"]

    def _take_shard(self, shard):
        """Keep this rank's entries only (of an unsharded memory just loaded)."""
        self.shard = shard
        mine = self._mine(self.entry_ids)
        for L in self.layers:
            for cols in (self._keys, self._values):
                c = cols[L]
                cols[L] = Column(c.row, c.dtype, data=c.view()[mine].clone(), n=int(mine.sum()))
        self.doc_ids, self.entry_ids = self.doc_ids[mine], self.entry_ids[mine]
        self._indexes, self.index_info = {}, {}

    def _read_indexes(self, path, man):
        """The saved faiss indexes, each checked against the manifest: its file's checksum, the
        fingerprint of the keys it was built over, its entry count. A mismatch (an index file copied from
        another memory, or keys changed under it) is refused: searching it would return wrong neighbours."""
        import faiss
        s = self.settings
        for L in self.layers:
            info = man.get("indexes", {}).get(str(L))
            if not info or info["backend"] != self.backend or man["metric"] != s.knn_metric:
                continue  # built lazily for the backend and metric in use
            info = dict(info)
            indexes = []
            for h in range(self.n_head):
                name = f"index.{L}.{h}.faiss"
                f = os.path.join(path, name)
                want = info["files"].get(name)
                if not os.path.isfile(f):
                    raise KNNMemoryError(f"{f} is missing; delete the 'indexes' entry of layer {L} from the manifest "
                                         "to rebuild the indexes from the keys, or rebuild the memory")
                size = os.path.getsize(f)
                if not isinstance(want, list) or len(want) != 2:
                    raise KNNMemoryError(f"{path}/manifest.json: indexes.{L}.files.{name} must be [bytes, checksum], "
                                         f"got {want!r}; restore the manifest, or delete the 'indexes' entry to rebuild")
                if size != want[0]:
                    raise KNNMemoryError(f"{f} is truncated or damaged ({size} bytes, the manifest says {want[0]}): "
                                         "delete the memory's index.*.faiss files and the manifest's 'indexes' entry "
                                         "to rebuild them from the keys, or rebuild the memory")
                if file_checksum(f) != want[1]:
                    raise KNNMemoryError(f"{f} is not the index this memory saved (checksum {file_checksum(f)}, "
                                         f"manifest {want[1]}): it may be copied from another memory and would return "
                                         "wrong neighbours. Restore the folder, or delete the memory's index.*.faiss "
                                         "files and the manifest's 'indexes' entry to rebuild them from the keys")
                try:
                    flags = faiss.IO_FLAG_MMAP if s.knn_mmap else 0
                    indexes.append(faiss.read_index(f, flags))
                except RuntimeError as e:
                    if "mmap" in str(e).lower() or "not supported" in str(e).lower():
                        indexes.append(faiss.read_index(f))
                    else:
                        raise KNNMemoryError(f"{f} is truncated or corrupt ({str(e).splitlines()[0][:200]}); delete "
                                             "it to rebuild the indexes from the keys, or rebuild the memory") from None
                if indexes[-1].ntotal != self.local_count + info.get("dead", 0):
                    raise KNNMemoryError(f"{f} indexes {indexes[-1].ntotal} entries, the memory has "
                                         f"{self.local_count}: it belongs to another memory; delete it to rebuild")
            if keys_fingerprint(self.keys[L], self.entry_ids) != info["keys"]:
                raise KNNMemoryError(f"{path}: the index files of layer {L} were built over other keys than "
                                     f"keys.{L}.npy holds (fingerprint {info['keys']}): delete index.{L}.*.faiss and "
                                     "the manifest's 'indexes' entry to rebuild them, or restore the folder")
            index = FaissIndex(self.keys[L], s.knn_metric, self.backend, info.get("nlist") or 0, 1, s.knn_pq_m,
                               indexes=indexes)
            index.set_probe(info.get("nprobe") or 1, info.get("ef_search") or 16)
            index.files = [os.path.join(path, f"index.{L}.{h}.faiss") for h in range(self.n_head)] if s.knn_mmap else None
            index.trained_count = info.get("count", self.local_count)
            index.refine = info.get("refine") or max(1, s.knn_refine)
            self._indexes[L] = index
            self._dead[L] = info.get("dead", 0)
            self.index_info[L] = {k: v for k, v in info.items() if k not in ("files", "keys", "dead")}


def _link_or_copy(src, dest):
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _remove(p):
    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)


MANIFEST_FIELDS = {  # name -> (check, what it must be); format 2 adds the second group
    "kind": (lambda v: isinstance(v, str), "a string"),
    "layers": (lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v), "a list of layer numbers"),
    "n_head": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "head_size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "count": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "fingerprint": (lambda v: isinstance(v, str), "a string"),
    "tokenizer": (lambda v: isinstance(v, dict), "an object"),
    "bookkeeping_token": (lambda v: v is None or _is_int(v), "an integer or null"),
    "remove_bookkeeping": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "metric": (lambda v: v in ("l2", "ip"), "'l2' or 'ip'"),
    "backend": (lambda v: v in BACKENDS, f"one of {', '.join(BACKENDS)}"),
    "documents": (lambda v: isinstance(v, list) and all(isinstance(d, dict) and _is_int(d.get("id"))
                                                         and _is_int(d.get("n_tokens")) for d in v),
                  "a list of {id, n_tokens, ...} objects"),
}
MANIFEST_FIELDS_V2 = {
    "value_size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "dtype": (lambda v: v in KEY_DTYPES, f"one of {', '.join(KEY_DTYPES)}"),
    "total": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "next_id": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "indexes": (lambda v: isinstance(v, dict) and all(isinstance(i, dict) and isinstance(i.get("files"), dict)
                                                       and isinstance(i.get("keys"), str) and i.get("backend") in BACKENDS
                                                       for i in v.values()),
                "an object of {backend, files, keys, ...} per layer"),
    "shard": (lambda v: v is None or (isinstance(v, dict) and all(_is_int(v.get(k)) for k in ("rank", "world", "block"))),
              "null or {rank, world, block}"),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_manifest(path: str, kind: str) -> dict:
    """A memory folder's manifest.json, every field checked: a wrong type or value is a KNNMemoryError
    naming the file, the field and what to do."""
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise KNNMemoryError(f"{path} is not a memory folder (no manifest.json): build one with memory_text=... "
                           "and memory_save=...")
    try:
        with open(manifest_path) as f:
            man = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KNNMemoryError(f"{manifest_path} is corrupt ({e}); rebuild the memory from its texts") from None
    if not isinstance(man, dict):
        raise KNNMemoryError(f"{manifest_path} is not a JSON object; rebuild the memory from its texts")
    version = man.get("format_version")
    if man.get("kind") != kind or version not in (1, FORMAT_VERSION):
        raise KNNMemoryError(f"{path}: not a {kind} of format 1 or {FORMAT_VERSION} "
                             f"(kind {man.get('kind')!r}, format {version!r})")
    fields_ = {**MANIFEST_FIELDS, **(MANIFEST_FIELDS_V2 if version >= 2 else {})}
    for name, (ok, what) in fields_.items():
        if name not in man:
            raise KNNMemoryError(f"{manifest_path}: field {name!r} is missing; it must be {what}. The manifest was "
                                 "edited or damaged: restore it, or rebuild the memory from its texts")
        if not ok(man[name]):
            raise KNNMemoryError(f"{manifest_path}: field {name!r} must be {what}, got {man[name]!r}. The manifest "
                                 "was edited or damaged: restore it, or rebuild the memory from its texts")
    if not man["layers"]:
        raise KNNMemoryError(f"{manifest_path}: field 'layers' is empty, but a memory holds at least one layer: "
                             "restore the manifest, or rebuild the memory with knn set (one k per layer)")
    if version == 1 and "value_size" in man and not (man["value_size"] is None or _is_int(man["value_size"])):
        raise KNNMemoryError(f"{manifest_path}: field 'value_size' must be a positive integer, got "
                             f"{man['value_size']!r}; restore the manifest or rebuild the memory")
    return man


class one_thread:
    """torch (and faiss) on one thread inside the block, as many as before after it."""

    def __enter__(self):
        import sys
        self.n = torch.get_num_threads()
        self.faiss = sys.modules.get("faiss")  # its wheel has an OpenMP pool of its own
        self.nf = self.faiss.omp_get_max_threads() if self.faiss else 1
        if self.n != 1:
            torch.set_num_threads(1)
        if self.nf != 1:
            self.faiss.omp_set_num_threads(1)

    def __exit__(self, *exc):
        if self.n != 1:
            torch.set_num_threads(self.n)
        if self.nf != 1:
            self.faiss.omp_set_num_threads(self.nf)


def _rank(scores, ids, extra, k):
    """The k best of every row: scores descending, ties by smaller id (so that any split of the
    entries into shards merges to the same order); returns (scores, ids, extra) gathered alike."""
    o1 = torch.argsort(ids, dim=1, stable=True)
    o2 = torch.sort(scores.gather(1, o1), dim=1, descending=True, stable=True).indices
    order = o1.gather(1, o2)[:, :k]
    return scores.gather(1, order), ids.gather(1, order), extra.gather(1, order)


def recall_sample(n: int, n_head: int, queries: int, seed: int):
    """(heads, rows) of the stored keys used as recall queries: rows drawn with torch.Generator(seed),
    heads in turn."""
    g = torch.Generator().manual_seed(seed)
    return torch.arange(queries) % n_head, torch.randint(0, n, (queries,), generator=g)


def _drop_own(ids, own, k):
    """The first k of each row of ids (Q, k + 1) that are not the row's own entry."""
    order = torch.argsort((ids == own[:, None]).int(), dim=1, stable=True)
    return ids.gather(1, order)[:, :k]


def recall_at_k(got, truth) -> float:
    """Mean over rows of |got ∩ truth| / k (ids; -1 in got never counts)."""
    hit = ((got[:, :, None] == truth[:, None, :]).any(-1) & (got >= 0)).sum()
    return hit.item() / truth.numel()


def _tune(recall, candidates, target):
    for c in candidates:
        if recall(c) >= target:
            return c
    return candidates[-1]


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
        if s.knn_documents and T == Tk and self.layer == s.layers[0]:
            # a pass over the whole context (not a cached step): each row chooses its documents from its keys
            ctx = k if rot is None else rot.rotate(k, -torch.arange(Tk, device=k.device))
            self.memory.select_documents(self.layer, ctx[:, :, s.remove_bookkeeping:], s.knn_documents)
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
        mixed = self.mix(b, kh, k_j, v_j, k_j if s.knn_query == "key" else q_r, mix_q)  # (M, d)
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

    def mix(self, rows, h, k_j, v_j, probe, mix_q):
        """Steps 3-6 for M chosen pairs of batch rows `rows` and stored (key/value) heads h: search (among
        each row's selected documents, with knn_documents), candidates, softmax mix, residual."""
        mem, s = self.memory, self.memory.settings
        if not s.knn_documents or mem.selection is None or all(sel is None for sel in mem.selection):
            cand_k, cand_v, _ = mem.search(self.layer, h, probe, min(self.k, len(mem)))  # (M, kk, d) each
            return self.blend(cand_k, cand_v, k_j, v_j, mix_q)
        mixed = torch.empty_like(v_j)
        for row in rows.unique().tolist():  # rows differ in how many entries their documents hold
            m = rows == row
            if mem.selection[row] is None:
                cand_k, cand_v, _ = mem.search(self.layer, h[m], probe[m], min(self.k, len(mem)))
            else:
                cand_k, cand_v, _ = mem.search_within(self.layer, h[m], probe[m], self.k, row)
            mixed[m] = self.blend(cand_k, cand_v, k_j[m], v_j[m], mix_q[m])
        return mixed

    def blend(self, cand_k, cand_v, k_j, v_j, mix_q):
        """Steps 4-6: candidates (M, c, d) mixed by softmax weights against mix_q, then the residual."""
        s = self.memory.settings
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
    def create(cls, model, settings: KNNSettings, tokenizer_meta: dict, tokenizer=None, storage_dir: str | None = None):
        cfg = model.config
        return cls(settings, [cfg.n_layer - 1], 1, cfg.n_embd, model_fingerprint(model), tokenizer_meta, None,
                   device=next(model.parameters()).device, value_size=1, storage_dir=storage_dir)

    def _check_model(self, model):
        cfg = model.config
        if cfg.n_embd != self.head_size or self.layers != [cfg.n_layer - 1]:
            raise KNNMemoryError(f"this datastore holds keys of width {self.head_size} from layer {self.layers[0]}; "
                                 f"the model has {cfg.n_layer} layers of width {cfg.n_embd}: build it with this model")

    @property
    def backend(self) -> str:
        # every position queries: below AUTO_IVF_FROM the batched matmul beats a per-query faiss flat scan;
        # from there on the same IVF choice as a memory (see KNNMemory.backend)
        if self.settings.knn_backend == "auto" and self.local_count < AUTO_IVF_FROM:
            return "torch"
        return KNNMemory.backend.fget(self)

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
    kk = min(k, len(store))
    chunk = max(16, min(chunk, (1 << 26) // max(1, len(store))))  # exact search holds chunk x N scores
    out = []
    for s in range(0, hf.size(0), chunk):
        q = hf[s:s + chunk]
        keys, tok, _ = store.search(L, torch.zeros(q.size(0), dtype=torch.long, device=q.device), q, kk)  # (M, kk, .)
        w = F.softmax(-((keys - q[:, None]) ** 2).sum(-1) / temperature, dim=-1)  # (M, kk)
        out.append(torch.zeros(q.size(0), vocab_size, device=q.device).scatter_add_(1, tok[..., 0].long(), w))
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


