import json

import bench
from test_llama import tiny_gguf  # noqa: F401  (a fixture)
from configurator import load_config


def test_bench_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    cfg = load_config(bench.BenchConfig, [], n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=64,
                      batch_size=2, bench_iters=2, gen_tokens=8, prompt_len=4, device="cpu", dtype="float32",
                      bench_json=str(out))
    bench.main(cfg)
    table = capsys.readouterr().out
    assert "generate batch 8, KV cache" in table and "train (batch 2 x 32)" in table
    res = json.loads(out.read_text())
    assert res["train"]["tokens_per_s"] > 0 and res["train"]["mfu"] is None  # CPU: MFU unknown
    combos = {(g["batch"], g["kv_cache"]) for g in res["generate"]}
    assert combos == {(1, True), (1, False), (8, True), (8, False)}
    assert all(g["tokens_per_s"] > 0 for g in res["generate"])


def test_knn_bench_suite(tmp_path, capsys):
    out = tmp_path / "bench.json"
    cfg = load_config(bench.BenchConfig, [], n_layer=2, n_head=2, n_embd=16, block_size=64, vocab_size=256,
                      gen_tokens=6, prompt_len=4, device="cpu", dtype="float32", suite=["knn"], knn_layer=1,
                      knn_sizes=[200, 3000], knn_ivf_from=3000, knn_context=20, bench_json=str(out))
    bench.main(cfg)
    table = capsys.readouterr().out
    assert "memory 3,000 (faiss-ivf, causal)" in table and "reference implementation" in table
    res = json.loads(out.read_text())["knn"]
    assert [(g["memory"], g.get("mode")) for g in res["generate"]] == [(0, None), (200, "causal"), (200, "reference"),
                                                                       (3000, "causal")]
    assert {s["size"] for s in res["search"]} == {200}  # exact-search rows below the IVF size
    assert res["build"]["tokens_per_s"] > 0 and set(res["reference"]["speedup"]) == {"causal", "reference"}


def test_dnc_bench_times_dense_sparse_and_the_reference(tmp_path, capsys):
    out = tmp_path / "bench_dnc.json"
    cfg = load_config(bench.BenchConfig, [], task="copy", bits=4, dnc_slots=[8, 128], word_size=4, read_heads=2,
                      hidden_size=8, sparse_links=4, batch_size=2, dnc_seq_len=3, bench_iters=1, device="cpu",
                      bench_json=str(out))
    bench.main(cfg)
    table = capsys.readouterr().out
    assert "DNC N=128 W=4 R=2, sparse links K=4" in table and "step-serial reference" in table
    runs = {(r["memory_slots"], r["variant"]): r for r in json.loads(out.read_text())["dnc"]}
    assert set(runs) == {(n, v) for n in (8, 128) for v in ("dense links", "sparse links K=4", "step-serial reference")}
    assert all(r["ms_per_batch"] > 0 for r in runs.values())
    # dense links keep N x N per step for the backward pass; sparse ones N x K
    dense, sparse = runs[(128, "dense links")], runs[(128, "sparse links K=4")]
    assert sparse["saved_for_backward_mb"] < dense["saved_for_backward_mb"] / 2
    assert dense["saved_for_backward_mb"] > 10 * runs[(8, "dense links")]["saved_for_backward_mb"]


def test_bench_does_not_import_the_trainer():
    import subprocess
    import sys
    from conftest import ROOT
    r = subprocess.run([sys.executable, "-c", "import sys, bench; assert 'train' not in sys.modules"], cwd=ROOT)
    assert r.returncode == 0


def test_smollm2_suite_times_transformers_and_the_memory_on_the_same_weights(tiny_gguf, tmp_path, capsys):
    """Suite 'smollm2' on a tiny Llama GGUF (the real model's suite is the same code): transformers' generate
    and ours give the same greedy tokens; memories of each size are timed."""
    path, _, _ = tiny_gguf
    memory = tmp_path / "memory.py"
    memory.write_text("knn = [0, 3]\nknn_query = 'query'\nbookkeeping_frac = 0.0\nresid_only = True\nresid_frac = 0.0\n")
    out = tmp_path / "bench.json"
    cfg = load_config(bench.BenchConfig, [], suite=["smollm2"], pretrained=str(path), knn_config=str(memory),
                      gen_batch_sizes=[1, 2], prompt_len=4, gen_tokens=5, bench_iters=1, knn_sizes=[20, 100],
                      device="cpu", dtype="float32", bench_json=str(out))
    bench.main(cfg)
    assert "batch 2: ours, memory 100 entries" in capsys.readouterr().out
    res = json.loads(out.read_text())["smollm2"]
    assert res["layers"] == [1] and res["settings"]["knn_recompute"] is False
    assert [r["batch"] for r in res["runs"]] == [1, 2] and all(r["greedy_tokens_equal"] for r in res["runs"])
    assert all(set(r["tokens_per_s"]) == {"transformers", "off", "20", "100"} for r in res["runs"])
