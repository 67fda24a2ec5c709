import json

import bench
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
