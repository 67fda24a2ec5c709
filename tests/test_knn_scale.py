"""The kNN store at scale (issue 15) and its reliability (issue 12): approximate backends and the
recall they report, the auto choice, memory-mapped folders, sharded search, the format-1 reader,
forgetting per backend, and damaged folders. Tiny sizes: every test runs in seconds."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import knn
from knn import KNNLMDatastore, KNNMemory, KNNMemoryError, KNNSettings, knn_probs, recall_sample
from test_knn import META, TEXT, TOK, TYPES, build, settings, tiny

H, D = 2, 8  # the tiny model's heads and head size (n_embd 16)


def clustered(n, seed, h=H, d=D, centres=40):
    """Keys in clusters (like attention keys): (h, n, d)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(h, centres, d, generator=g) * 3
    which = torch.randint(0, centres, (h, n), generator=g)
    return c.gather(1, which[..., None].expand(h, n, d)) + torch.randn(h, n, d, generator=g)


def filled(n, seed=0, **kw):
    """A memory of the tiny model (layer 1) holding n clustered entries."""
    model = tiny()
    mem = KNNMemory.create(model, settings(**kw), META, TOK)
    mem.add_entries({1: clustered(n, seed)}, {1: torch.randn(H, n, D, generator=torch.Generator().manual_seed(seed + 1))})
    return model, mem


def brute(keys, q, k, metric="l2", exclude=None):
    """Ids of the k nearest keys (N, d) to q (d,), nearest first, written out."""
    score = -((keys - q) ** 2).sum(-1) if metric == "l2" else keys @ q
    if exclude is not None:
        score[exclude] = float("-inf")
    return score.topk(k).indices


@pytest.mark.parametrize("backend", ["faiss-ivfsq8", "faiss-ivfpqfs", "faiss-hnsw", "faiss-sq8"])
def test_reported_recall_equals_a_recomputation(backend):
    model, mem = filled(3000, knn_backend=backend, knn_nlist=32, knn_tune="always")
    mem.index(1)
    info = mem.index_info[1]
    k, q = info["recall_k"], info["recall_queries"]
    heads, rows = recall_sample(len(mem), H, q, info["recall_seed"])
    keys = mem.keys[1].float()
    hits = 0
    for h, r in zip(heads.tolist(), rows.tolist()):
        exact = set(brute(keys[h], keys[h, r], k, exclude=r).tolist())
        _, _, got = mem.search(1, torch.tensor([h]), keys[h, r][None], k + 1)
        got = [i for i in got[0].tolist() if i != r][:k]
        hits += len(exact & set(got))
    assert info["recall_at_k"] == pytest.approx(hits / (q * k))
    if backend in ("faiss-ivfsq8", "faiss-hnsw"):  # nprobe / efSearch were tuned up to the target
        assert info["recall_at_k"] >= mem.settings.knn_recall_target
    assert 0 < info["recall_at_k"] <= 1


def test_auto_picks_by_the_measured_thresholds(monkeypatch):
    monkeypatch.setattr(knn, "AUTO_FAISS_FROM", 100)
    monkeypatch.setattr(knn, "AUTO_IVF_FROM", 1000)
    monkeypatch.setattr(knn, "AUTO_PQ_FROM", 3000)
    model, mem = filled(50)
    picks = [mem.backend]
    for n in (100, 900, 2000):  # to 150, 1050, 3050 entries
        mem.add_entries({1: clustered(n, n)}, {1: torch.randn(H, n, D)})
        picks.append(mem.backend)
    assert picks == ["torch", "faiss-flat", "faiss-ivfsq8", "faiss-ivfpqfs"]
    mem.settings.mem_frac = 5.0  # many queries per head: the matmul below the IVF size
    assert filled(150, mem_frac=5.0)[1].backend == "torch"
    mem.index(1)
    info = mem.index_info[1]
    assert info["backend"] == "faiss-ivfpqfs" and info["recall_at_k"] >= 0.95 and info["nprobe"] >= 1
    store = KNNLMDatastore.create(model, KNNSettings(), {})
    assert store.backend == "torch"  # every position queries: the matmul, below the IVF size


def test_approximate_search_grows_and_forgets_without_rebuilding():
    model, mem = filled(2000, knn_backend="faiss-ivf", knn_nlist=16, knn_nprobe=16)
    first = mem.index(1)
    doc = mem.add_entries({1: clustered(300, 9)}, {1: torch.randn(H, 300, D)})
    assert mem.index(1) is first and first.ntotal == 2300  # assigned to the lists, not retrained
    q = mem.keys[1][0, 2100].float()[None]
    assert mem.search(1, torch.tensor([0]), q, 1)[2].item() == 2100
    mem.remove(doc)
    assert mem.index(1) is first and first.ntotal == 2000  # remove_ids
    ids = mem.search(1, torch.zeros(20, dtype=torch.long), torch.randn(20, D), 5)[2]
    assert ids.max() < 2000
    exact = KNNMemory(mem.settings, [1], H, D, "x", {}, 0)
    exact.settings = settings(knn_backend="torch")
    exact.add_entries({1: mem.keys[1]}, {1: mem.values[1]})
    qs = torch.randn(20, D)
    assert torch.equal(mem.search(1, torch.zeros(20, dtype=torch.long), qs, 5)[2],
                       exact.search(1, torch.zeros(20, dtype=torch.long), qs, 5)[2])  # all 16 lists probed: exact


def test_forgetting_a_middle_document_keeps_ids_and_results_right():
    """After a document in the middle is forgotten the stable ids have a gap (positions are then found
    by search, not by subtraction): IVF with every list probed still returns what exact search does."""
    model, mem = filled(1000, knn_backend="faiss-ivf", knn_nlist=16, knn_nprobe=16)
    middle = mem.add_entries({1: clustered(300, 9)}, {1: torch.randn(H, 300, D)})
    mem.add_entries({1: clustered(200, 10)}, {1: torch.randn(H, 200, D)})
    mem.index(1)
    mem.remove(middle)
    assert mem.entry_ids[999].item() == 999 and mem.entry_ids[1000].item() == 1300  # a gap of 300
    exact = KNNMemory(mem.settings, [1], H, D, "x", {}, 0)
    exact.settings = settings(knn_backend="torch")
    exact.add_entries({1: mem.keys[1]}, {1: mem.values[1]})
    heads, qs = torch.arange(20) % H, torch.randn(20, D)
    got, want = mem.search(1, heads, qs, 5), exact.search(1, heads, qs, 5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # the same keys and values
    assert torch.equal(got[2], mem.entry_ids[want[2]])  # under their stable ids


def test_hnsw_forgets_by_tombstones_then_rebuilds():
    model, mem = filled(1000, knn_backend="faiss-hnsw", knn_hnsw_m=8)
    graph = mem.index(1)
    doc = mem.add_entries({1: clustered(100, 5)}, {1: torch.randn(H, 100, D)})
    mem.remove(doc)
    assert mem.index(1) is graph and graph.ntotal == 1100 and mem._dead[1] == 100  # tombstoned, still in the graph
    qs = clustered(30, 5)[0]  # near the forgotten entries
    ids = mem.search(1, torch.zeros(30, dtype=torch.long), qs, 5)[2]
    assert (ids < 1000).all() and (ids >= 0).all()
    doc = mem.add_entries({1: clustered(400, 6)}, {1: torch.randn(H, 400, D)})
    mem.remove(doc)  # 500 of 1500 dead: more than a quarter, so the graph is rebuilt from the live entries
    assert mem.index(1) is not graph and mem.index(1).ntotal == 1000


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_mapped_folder_equals_in_ram_bit_for_bit(tmp_path, dtype):
    model = tiny(seed=6)
    s = settings(knn_dtype=dtype, knn_backend="faiss-ivfsq8", knn_nlist=4, **TYPES["type3"])
    mem = build(model, s, [TEXT, "a second document"])
    mem.add_entries({L: clustered(500, L) for L in mem.layers}, {L: torch.randn(H, 500, D) for L in mem.layers})
    assert mem.keys[1].dtype == getattr(torch, dtype)
    mem.save(tmp_path / "mem")
    ram = KNNMemory.load(tmp_path / "mem", model, settings(**{**s.__dict__, "knn_mmap": False}))
    mapped = KNNMemory.load(tmp_path / "mem", model, s)
    assert mapped._keys[1].source is not None and ram._keys[1].source is None  # mapped, read into RAM
    assert mapped.index_info[1]["recall_at_k"] == mem.index_info[1]["recall_at_k"]
    heads, qs = torch.randint(0, H, (40,)), torch.randn(40, D)
    for L in mem.layers:
        a, b, c = (m.search(L, heads, qs, 5) for m in (mem, ram, mapped))
        for x, y, z in zip(a, b, c):
            assert torch.equal(x, y) and torch.equal(x, z)
    idx = torch.tensor([TOK.encode("\nthe quick")])
    outs = []
    for m in (mem, ram, mapped):
        m.attach(model)
        with torch.no_grad():
            outs.append(model(idx, targets=idx)[0])
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # a mapped memory that grows is copied into RAM first; the folder is untouched until saved
    before = (tmp_path / "mem" / "keys.1.npy").read_bytes()
    mapped.add_text(model, TOK, "more words")
    assert mapped._keys[1].source is None and (tmp_path / "mem" / "keys.1.npy").read_bytes() == before
    mapped.save(tmp_path / "mem")
    assert len(KNNMemory.load(tmp_path / "mem", model, s)) == len(mem) + len("more words")


def test_memory_built_on_disk_is_saved_in_place(tmp_path):
    model = tiny(seed=2)
    s = settings(knn_dtype="float16")
    disk = KNNMemory.create(model, s, META, TOK, storage_dir=str(tmp_path / "big"))
    ram = KNNMemory.create(model, s, META, TOK)
    for m in (disk, ram):
        for i in range(3):
            m.add_entries({L: clustered(700, i) for L in m.layers}, {L: clustered(700, i + 9) for L in m.layers})
        m.remove(1)
    assert disk._keys[1].path and torch.equal(disk.keys[1], ram.keys[1]) and torch.equal(disk.values[1], ram.values[1])
    disk.save(tmp_path / "big")  # in place: the arrays are already there, the manifest is written last
    loaded = KNNMemory.load(tmp_path / "big", model, s)
    assert torch.equal(loaded.keys[1], ram.keys[1]) and torch.equal(loaded.entry_ids, ram.entry_ids)
    assert loaded.entry_ids.tolist() == list(range(700)) + list(range(1400, 2100))


def _sharded_worker(rank, world, folder, port, out, backend):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = tiny(seed=3)
        s = settings(knn=[0, 3, 2], knn_backend=backend, knn_shard_block=16, **TYPES["type1"])
        mem = KNNMemory.load(folder, model, s, shard=(rank, world))
        heads = torch.arange(40) % H
        qs = torch.randn(40, D, generator=torch.Generator().manual_seed(1))
        res = {L: [t.clone() for t in mem.search(L, heads, qs, 7)] for L in mem.layers}
        mem.attach(model)
        idx = torch.tensor([TOK.encode("\nthe lazy fox"), TOK.encode("\nwarm dog sun")])
        with torch.no_grad():
            logits = model(idx, targets=idx)[0]
        if rank == 0:
            torch.save({"search": res, "logits": logits, "local": mem.local_count, "total": len(mem)}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "faiss-flat"])
def test_sharded_memory_gives_exactly_the_unsharded_neighbours(tmp_path, backend):
    import socket
    import torch.multiprocessing as mp
    model = tiny(seed=3)
    s = settings(knn=[0, 3, 2], knn_backend=backend, **TYPES["type1"])
    mem = build(model, s, [TEXT, TEXT[::-1]])
    mem.add_entries({L: clustered(300, L) for L in mem.layers}, {L: torch.randn(H, 300, D) for L in mem.layers})
    mem.save(tmp_path / "mem")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "mem"), port, str(tmp_path / "out.pt"), backend), nprocs=2)
    got = torch.load(tmp_path / "out.pt")
    assert got["total"] == len(mem) and 0 < got["local"] < len(mem)
    heads = torch.arange(40) % H
    qs = torch.randn(40, D, generator=torch.Generator().manual_seed(1))
    for L in mem.layers:
        for x, y in zip(mem.search(L, heads, qs, 7), got["search"][L]):
            assert torch.equal(x, y)
    mem.attach(model)
    idx = torch.tensor([TOK.encode("\nthe lazy fox"), TOK.encode("\nwarm dog sun")])
    with torch.no_grad():
        assert torch.equal(model(idx, targets=idx)[0], got["logits"])


def _write_v1(mem, folder):
    """A memory folder as format 1 wrote it: kv.safetensors (keys.L, values.L (H, N, d), doc_ids), a
    manifest without dtype, ids or index fingerprints, and a bare faiss index per layer and head."""
    import faiss
    from safetensors.torch import save_file
    os.makedirs(folder)
    tensors = {"doc_ids": mem.doc_ids.contiguous()}
    for L in mem.layers:
        tensors[f"keys.{L}"] = mem.keys[L].float().contiguous()
        tensors[f"values.{L}"] = mem.values[L].float().contiguous()
        for h in range(mem.n_head):
            ix = faiss.IndexFlatL2(mem.head_size)
            ix.add(np.ascontiguousarray(mem.keys[L][h].numpy()[::-1]))  # wrong order: must not be trusted
            faiss.write_index(ix, os.path.join(folder, f"index.{L}.{h}.faiss"))
    save_file(tensors, os.path.join(folder, "kv.safetensors"))
    man = {k: v for k, v in mem.manifest().items() if k not in ("total", "next_id", "dtype", "shard", "indexes")}
    (folder / "manifest.json").write_text(json.dumps({**man, "format_version": 1, "backend": "faiss-flat"}))


def test_format_1_folder_loads_and_resaves_as_format_2(tmp_path):
    model = tiny(seed=6)
    s = settings(knn_backend="faiss-flat", **TYPES["type3"])
    mem = build(model, s, [TEXT, "a second document"])
    _write_v1(mem, tmp_path / "v1")
    old = KNNMemory.load(tmp_path / "v1", model, s)
    assert torch.equal(old.keys[1], mem.keys[1]) and torch.equal(old.doc_ids, mem.doc_ids) and not old._indexes
    heads, qs = torch.randint(0, H, (30,)), torch.randn(30, D)
    for x, y in zip(old.search(1, heads, qs, 3), mem.search(1, heads, qs, 3)):
        assert torch.equal(x, y)  # its unfingerprinted index files were not used: rebuilt from the keys
    old.save(tmp_path / "v1")
    again = KNNMemory.load(tmp_path / "v1", model, s)
    assert json.loads((tmp_path / "v1" / "manifest.json").read_text())["format_version"] == 2
    assert set(again._indexes) == {1} and not (tmp_path / "v1" / "kv.safetensors").exists()


@pytest.mark.parametrize("field,value,match", [
    ("layers", [], "'layers' is empty"),
    ("layers", "9", "'layers' must be a list"),
    ("n_head", "2", "'n_head' must be a positive integer"),
    ("count", -1, "'count' must be"),
    ("dtype", "float64", "'dtype' must be one of"),
    ("documents", [{"id": "0"}], "'documents' must be"),
    ("metric", None, "'metric' must be"),
    ("fingerprint", None, "'fingerprint' must be a string"),
])
def test_damaged_manifest_is_refused_naming_the_field(tmp_path, field, value, match):
    model = tiny()
    mem = build(model, settings())
    mem.save(tmp_path / "mem")
    path = tmp_path / "mem" / "manifest.json"
    man = json.loads(path.read_text())
    man[field] = value
    path.write_text(json.dumps(man))
    with pytest.raises(KNNMemoryError, match=match) as e:
        KNNMemory.load(tmp_path / "mem", model, settings())
    assert "manifest.json" in str(e.value) and ("rebuild" in str(e.value) or "restore" in str(e.value))
    del man[field]
    path.write_text(json.dumps(man))
    with pytest.raises(KNNMemoryError, match=f"'{field}' is missing"):
        KNNMemory.load(tmp_path / "mem", model, settings())


def test_damaged_or_foreign_index_files_are_refused(tmp_path):
    model = tiny()
    s = settings(knn_backend="faiss-flat")
    a, b = build(model, s, [TEXT]), build(model, s, [TEXT[::-1]])  # same size, other keys
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    name = "index.1.0.faiss"
    shutil.copy(tmp_path / "b" / name, tmp_path / "a" / name)  # the case: it loaded and gave wrong neighbours
    with pytest.raises(KNNMemoryError, match="not the index this memory saved"):
        KNNMemory.load(tmp_path / "a", model, s)
    # the index files and their manifest entry copied together: the keys' fingerprint tells
    man_a, man_b = (json.loads((tmp_path / x / "manifest.json").read_text()) for x in "ab")
    man_a["indexes"]["1"] = man_b["indexes"]["1"]
    for h in range(H):
        shutil.copy(tmp_path / "b" / f"index.1.{h}.faiss", tmp_path / "a" / f"index.1.{h}.faiss")
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(man_a))
    with pytest.raises(KNNMemoryError, match="built over other keys"):
        KNNMemory.load(tmp_path / "a", model, s)
    # a truncated index file
    a.save(tmp_path / "a")
    f = tmp_path / "a" / name
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(KNNMemoryError, match="truncated"):
        KNNMemory.load(tmp_path / "a", model, s)
    # garbage of the right size: faiss cannot read it
    a.save(tmp_path / "a")
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    f.write_bytes(b"\0" * f.stat().st_size)
    man["indexes"]["1"]["files"][name][1] = knn.file_checksum(str(f))
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(KNNMemoryError, match="truncated or corrupt"):
        KNNMemory.load(tmp_path / "a", model, s)


def test_leftovers_of_a_killed_save_are_removed(tmp_path):
    model = tiny()
    mem = build(model, settings())
    mem.save(tmp_path / "mem")
    (tmp_path / "mem" / "k.tmp").write_bytes(b"\0" * 100_000)  # atomic_write's temp file of a killed save
    (tmp_path / "mem.tmp").mkdir()  # a killed save's half-written folder
    (tmp_path / "mem.tmp" / "keys.1.npy").write_bytes(b"\0" * 100_000)
    mem.save(tmp_path / "mem")
    assert not (tmp_path / "mem" / "k.tmp").exists() and not (tmp_path / "mem.tmp").exists()
    assert len(KNNMemory.load(tmp_path / "mem", model, settings())) == len(mem)


def test_datastore_shares_the_scalable_store(tmp_path, monkeypatch):
    monkeypatch.setattr(knn, "AUTO_IVF_FROM", 200)
    from test_memorizing import tiny_gpt
    model = tiny_gpt()
    store = KNNLMDatastore.create(model, KNNSettings(knn_dtype="float16", knn_nlist=8), {"tokenizer": "char"})
    store.add_tokens(model, torch.randint(0, 50, (400,), generator=torch.Generator().manual_seed(0)).tolist())
    assert store.backend == "faiss-ivfsq8"
    h = torch.randn(2, 8, store.head_size)
    want = knn_probs(h, store, 6, 1.0, 50)
    assert store.index_info[2]["recall_at_k"] >= 0.95
    store.save(tmp_path / "ds")
    loaded = KNNLMDatastore.load(tmp_path / "ds", model, store.settings)
    assert loaded._keys[2].source is not None and torch.equal(knn_probs(h, loaded, 6, 1.0, 50), want)
    assert torch.equal(loaded.next_tokens(), store.next_tokens())


def test_knn_scale_bench_suite(tmp_path, capsys, monkeypatch):
    import bench
    from configurator import load_config
    monkeypatch.setattr(knn, "AUTO_IVF_FROM", 2000)
    out = tmp_path / "bench.json"
    cfg = load_config(bench.BenchConfig, [], n_layer=2, n_head=2, n_embd=16, block_size=64, vocab_size=256,
                      gen_tokens=4, prompt_len=4, device="cpu", dtype="float32", suite=["knn_scale"], knn_layer=1,
                      knn_scale_sizes=[200, 3000], knn_scale_compare_at=200, knn_scale_compare=["faiss-sq8"],
                      knn_scale_disk_from=3000, knn_scale_exact_max=200, knn_scale_dir=str(tmp_path / "mem"), knn_scale_repeats=1,
                      knn_scale_build_tokens=20, knn_scale_nlist=32, bench_json=str(out))
    bench.main(cfg)
    assert "auto (faiss-ivfsq8)" in capsys.readouterr().out
    runs = json.loads(out.read_text())["knn_scale"]["runs"]
    assert [(r["size"], r["variant"], r["mode"]) for r in runs] == [
        (200, "auto (torch)", "causal"), (200, "faiss-sq8", "causal"), (200, "auto (torch)", "reference"),
        (3000, "auto (faiss-ivfsq8)", "causal")]
    big = runs[-1]
    assert big["recall_at_5"] >= 0.95 and big["open_s"] > 0 and big["build_tok_s"] > 0 and big["dtype"] == "float16"
    assert big["kv_bytes_per_entry_head"] == 2 * 8 * 2 and 8 <= big["index_bytes_per_entry_head"] < 40
    assert not (tmp_path / "mem" / "m3000").exists()  # the on-disk memory is removed after its rows


def test_knn_scale_bench_leaves_no_temp_folder(tmp_path, monkeypatch):
    import tempfile
    import bench
    from configurator import load_config
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = load_config(bench.BenchConfig, [], n_layer=2, n_head=2, n_embd=16, block_size=64, vocab_size=256,
                      gen_tokens=2, prompt_len=4, device="cpu", dtype="float32", suite=["knn_scale"], knn_layer=1,
                      knn_scale_sizes=[200], knn_scale_compare=[], knn_scale_repeats=1, knn_scale_build_tokens=20,
                      bench_json=str(tmp_path / "bench.json"))
    bench.main(cfg)
    assert os.listdir(tmp_path) == ["bench.json"]


def test_knn_scale_bench_times_a_head_subset(tmp_path, monkeypatch):
    """A memory of one head standing in for all the model's heads (sizes too large to build whole)."""
    import bench
    from configurator import load_config
    monkeypatch.setattr(knn, "AUTO_IVF_FROM", 2000)
    out = tmp_path / "bench.json"
    cfg = load_config(bench.BenchConfig, [], n_layer=2, n_head=2, n_embd=16, block_size=64, vocab_size=256,
                      gen_tokens=4, prompt_len=4, device="cpu", dtype="float32", suite=["knn_scale"], knn_layer=1,
                      knn_scale_sizes=[3000], knn_scale_heads=1, knn_scale_disk_from=3000, knn_scale_repeats=1,
                      knn_scale_dir=str(tmp_path / "mem"), knn_scale_build_tokens=20, knn_scale_nlist=32,
                      bench_json=str(out))
    bench.main(cfg)
    run = json.loads(out.read_text())["knn_scale"]["runs"][0]
    assert run["variant"] == "auto (faiss-ivfsq8) 1/2 heads" and run["heads_built"] == 1
    assert run["search_ms_per_token"] > 0 and run["open_s"] > 0 and run["recall_at_5"] >= 0.95
