"""Long-range recall: the passkey / facts_long generators, the docs loader feeding them, and
evaluate.py eval='longrange' (tiny settings: a few seconds)."""
import contextlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import prepare
import train
from configurator import ConfigError
from conftest import tiny_train_config
from data import DocStream
from memory import memorizing_layer
from test_memorizing import record_memory_fill

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(block_size=32, windows=(2.0, 4.0), eval_windows=(2, 4), n_train=40, n_val=3)


def records(corpus, split):
    return [json.loads(line) for line in corpus.extra_files[f"longrange_{split}.jsonl"].splitlines()]


def texts(corpus, split):
    return list(getattr(corpus, split))


@pytest.fixture(scope="module")
def passkey_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "passkey"
    prepare.prepare("passkey", out_dir=str(out), options=TINY)
    return out


# -----------------------------------------------------------------------------
# generators

def test_passkey_is_deterministic_and_holds_keys_out():
    a, b = (prepare.load_passkey(None, 0.1, 7, **TINY) for _ in range(2))
    assert texts(a, "train") == texts(b, "train") and texts(a, "val") == texts(b, "val")
    assert records(a, "val") == records(b, "val")
    other = prepare.load_passkey(None, 0.1, 8, **TINY)
    assert texts(other, "train") != texts(a, "train")
    big = prepare.load_passkey(None, 0.1, 7, **{**TINY, "n_train": 2000, "n_val": 100})
    train_keys = {q["answer"] for r in records(big, "train") for q in r["queries"]}
    val_keys = {q["answer"] for r in records(big, "val") for q in r["queries"]}
    assert len(train_keys) > 1900 and len(val_keys) > 190
    assert not train_keys & val_keys  # no val key is ever seen in training


@pytest.mark.parametrize("filler", ["cycle", "random"])
def test_passkey_distances_are_as_recorded(filler):
    corpus = prepare.load_passkey(None, 0.1, 3, **TINY, filler=filler)
    T = TINY["block_size"]
    for split in ("train", "val"):
        for text, rec in zip(texts(corpus, split), records(corpus, split)):
            (q,) = rec["queries"]
            key = q["answer"]
            assert re.fullmatch(r"\d{5}", key)
            assert text[q["source_start"]:q["source_start"] + 5] == key == text[q["answer_start"]:q["answer_start"] + 5]
            assert re.findall(r"\d+", text) == [key, key]  # the key is the only number: stated once, answered once
            assert text.endswith(prepare.PASSKEY_QUESTION + key + ".")
            assert q["distance"] == q["answer_start"] - q["source_start"] == max(round(q["windows"] * T), 58)
            assert rec["key_window"] == q["source_start"] // T and rec["answer_window"] == (q["answer_start"] - 1) // T
            lo, hi = TINY["windows"]
            assert (lo <= q["windows"] <= hi) if split == "train" else q["windows"] in TINY["eval_windows"]
    # val: the same number of documents at every distance, interleaved
    assert [r["queries"][0]["windows"] for r in records(corpus, "val")] == [2, 4] * 3
    sentences = prepare.PASSKEY_CYCLE if filler == "cycle" else prepare.PASSKEY_FILLER
    words = {w for s in sentences for w in s.split()}
    for text in texts(corpus, "train"):
        for segment in re.split(r"The pass key is \d+\. Remember it\.|What is the pass key\? The pass key is \d+\.", text):
            assert set(segment.split()[:-1]) <= words  # whole sentences, but for a cut last word
            if filler == "cycle":  # the sentences in turn, from any of them
                found = [s for s in re.findall(r"[A-Z][^.]*\.", segment) if s in sentences]
                assert all(sentences.index(b) == (sentences.index(a) + 1) % 5 for a, b in zip(found, found[1:]))


def test_passkey_filler_from_a_corpus(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("Chapter 1. It was 1999 and the sea was grey.\n" * 200)
    corpus = prepare.load_passkey(str(src), 0.1, 1, **{**TINY, "eval_windows": (8,)})
    for text, rec in zip(texts(corpus, "val"), records(corpus, "val")):
        assert "sea was grey" in text and "The grass is green" not in text
        assert re.findall(r"\d+", text) == [rec["queries"][0]["answer"]] * 2  # the corpus's digits are dropped


def test_generator_options_are_checked(tmp_path):
    assert prepare.parse_options(["block_size=256", "windows=(1, 4)"]) == {"block_size": 256, "windows": (1, 4)}
    with pytest.raises(DataError := prepare.DataError, match="unknown generator option"):
        prepare.load_passkey(None, 0.1, 1, size=3)
    with pytest.raises(DataError, match="takes no generator options"):
        prepare.prepare("facts", out_dir=str(tmp_path), options={"block_size": 64})
    with pytest.raises(DataError, match="KEY=VALUE"):
        prepare.parse_options(["block_size"])
    with pytest.raises(SystemExit, match="^error: --option 'block_size' needs the form KEY=VALUE$"):  # one line
        prepare.main(["passkey", "--out_dir", str(tmp_path / "p"), "--option", "block_size"])


def test_prepared_passkey_matches_its_records(passkey_dir):
    meta = prepare.load_meta(passkey_dir)
    tok = prepare.get_tokenizer(meta)
    docs = prepare.split_documents(str(passkey_dir), "val")
    recs = [json.loads(line) for line in open(passkey_dir / "longrange_val.jsonl")]
    assert len(docs) == len(recs) == 6
    for d, r in zip(docs, recs):
        q = r["queries"][0]
        assert tok.decode(d[q["answer_start"]:q["answer_start"] + 5]) == q["answer"]
    gen = json.loads((passkey_dir / "generator.json").read_text())
    assert gen["task"] == "passkey" and gen["block_size"] == 32


# -----------------------------------------------------------------------------
# the docs loader and the memory

def test_loader_feeds_each_document_in_order_and_the_memory_is_cleared_between_them(passkey_dir, monkeypatch):
    """Row by row, the windows DocStream hands out spell the row's documents from start to end, and in
    training a memorizing layer's row holds exactly its document's earlier windows (empty at each start)."""
    meta = prepare.load_meta(passkey_dir)
    data = prepare.open_split(passkey_dir, "train", meta)
    starts = prepare.load_doc_starts(passkey_dir, "train", len(data))
    T, rows = 32, 4
    s = DocStream(data, starts, rows, T, seed=5)
    ends = np.r_[starts[1:], len(data)]
    for g in range(rows):
        read, docs = [], []
        for it in range(60):
            x, y, last, _ = s.batch(it, [g], "cpu")
            doc, w = s.locate(it, g)
            if w == 0:
                docs.append(doc)
            read.extend(x[0][y[0] >= 0].tolist())
            if last[0]:
                a, b = starts[doc], ends[doc]
                assert read == data[a:b - 1].tolist()  # the whole document, in order (its last token is a target)
                read = []
        assert len(docs) >= 2

    seen = record_memory_fill(monkeypatch)
    cfg = tiny_train_config(passkey_dir.parent, passkey_dir.parent / "out", dataset="passkey", loader="docs",
                            knn_layer=1, knn_topk=4, knn_memory_size=4096, max_iters=25, eval_interval=1000,
                            block_size=T, batch_size=2)
    train.main(cfg)
    stream = DocStream(data, starts, 2, T, cfg.seed)
    fresh = 0
    for it, held in enumerate(seen):
        for r, n in enumerate(held):
            w = stream.locate(it, r)[1]
            assert n == w * T  # the document's earlier windows and nothing else
            fresh += w == 0 and it > 0
    assert fresh > 0


# -----------------------------------------------------------------------------
# the evaluation

@pytest.fixture(scope="module")
def checkpoints(passkey_dir):
    outs = {}
    for name, extra in (("base", {}), ("knn", dict(knn_layer=1, knn_topk=4, knn_memory_size=4096)),
                        ("mnm", dict(mnm_layer=1, mnm_heads=2, mnm_key_size=4, mnm_hidden=8, mnm_shift=True))):
        out = passkey_dir.parent / f"out-{name}"
        train.main(tiny_train_config(passkey_dir.parent, out, dataset="passkey", loader="docs", block_size=32,
                                     max_iters=4, eval_interval=4, eval_iters=1, batch_size=2, **extra))
        outs[name] = str(out)
    return outs


def test_longrange_eval_writes_json_and_png_with_every_arm_on_the_same_documents(passkey_dir, checkpoints, tmp_path):
    from configurator import load_config
    cfg = load_config(evaluate.EvalConfig, [], eval="longrange", eval_dataset="passkey",
                      data_dir=str(passkey_dir.parent), out_dirs=[checkpoints["base"], checkpoints["knn"], checkpoints["mnm"]],
                      eval_out=str(tmp_path / "ev"), device="cpu", dtype="float32", batch_size=4,
                      knn=[0, 3], knn_query="query", knn_metric="ip", knn_recompute=False, bookkeeping_frac=0.0,
                      mem_frac=1000.0, knnlm_lambdas=[0.5], knnlm_k=4)
    result = evaluate.main(cfg)
    saved = json.loads((tmp_path / "ev" / "longrange.json").read_text())
    assert (tmp_path / "ev" / "longrange.png").stat().st_size > 1000
    assert [r["arm"] for r in saved["rows"]] == [r["arm"] for r in result["rows"]]
    assert len(saved["rows"]) == 5  # three checkpoints, the kNN memory, kNN-LM
    assert {r["kind"] for r in saved["rows"]} == {"no memory", "memorizing layer 1, topk 4", "MNM block 1", "knn memory",
                                             "knnlm"}
    docs = prepare.longrange_documents(str(passkey_dir), "val", prepare.get_tokenizer(prepare.load_meta(passkey_dir)))
    T = json.loads((passkey_dir / "generator.json").read_text())["block_size"]
    n_split = sum((q["source_start"] + 4) // T > q["source_start"] // T for d in docs for q in d["queries"])
    assert 0 < n_split < 6  # the fixture's keys: some across a window boundary, some not
    for r in saved["rows"]:  # every arm answered the same queries
        assert [(b["windows"], b["queries"]) for b in r["by_distance"]] == [(2, 3), (4, 3)]
        assert 0 <= r["exact"] <= 1
        # keys 2 and 4 windows back: every value was stated before its answer's window, whole or split
        assert {k: v["queries"] for k, v in r["by_window"].items()} == {"earlier window": 6 - n_split,
                                                                         "split across windows": n_split}
    retrieval = saved["rows"][1]["retrieval"]
    assert len(retrieval["gates"]) == 2 and retrieval["by_distance"]
    for b in retrieval["by_distance"]:  # weighted most only where retrieved
        assert all(0 <= f <= r <= 1 for f, r in zip(b["first_per_head"], b["retrieved_per_head"]))
    writes = saved["rows"][2]["writes"]  # the MNM block's write diagnostics, per distance
    assert writes["shift"] and [b["windows"] for b in writes["by_distance"]] == [2, 4]
    assert all(len(b["value_share_per_head"]) == 2 and 0 < b["uniform"] < 1 for b in writes["by_distance"])
    assert len({len(v) for v in saved["per_document"].values()}) == 1
    for r in saved["rows"]:  # the 5-digit keys wholly in an earlier window, digit by digit
        assert [(c["place"], c["answers"]) for c in r["earlier_window_by_place"]] == [(j, 6 - n_split) for j in range(1, 6)]
        assert all(0 <= c["right"] <= 1 for c in r["earlier_window_by_place"])
    assert [c["place"] for c in writes["value_token_strength"]] == [1, 2, 3, 4, 5]
    assert len(writes["value_key_cosine"]) == 2


@pytest.mark.parametrize("shift", [False, True])
def test_mnm_write_diagnostics_find_the_strength_spent_on_the_key(passkey_dir, shift):
    """A model whose MNM block writes digits only (its blocks' outputs zeroed, so the block sees the token
    embeddings, whose first coordinate marks a digit): the key's window spends all its write strength on
    the key (1.0 for every head, with or without mnm_shift); with even strengths, the share is the
    even spread's."""
    from memory import MemoryConfig, attach_memories, mnm_block
    from model import GPT, GPTConfig
    meta = prepare.load_meta(passkey_dir)
    tok = prepare.get_tokenizer(meta)
    docs = prepare.longrange_documents(str(passkey_dir), "val", tok)
    torch.manual_seed(0)
    model = attach_memories(GPT(GPTConfig(block_size=32, vocab_size=meta["vocab_size"], n_layer=2, n_head=2,
                                          n_embd=16, pos="rope")),
                            MemoryConfig(mnm_layer=0, mnm_heads=2, mnm_key_size=4, mnm_hidden=8, mnm_shift=shift)).eval()
    mnm = mnm_block(model).mnm
    rows = [h * (2 * mnm.dk + mnm.dv + 2) + 2 * mnm.dk + mnm.dv for h in range(mnm.H)]  # the strength logits
    with torch.no_grad():
        mnm_block(model).block.attn.c_proj.weight.zero_()
        mnm_block(model).block.attn.c_proj.bias.zero_()
        mnm_block(model).block.mlp.c_proj.weight.zero_()
        mnm_block(model).block.mlp.c_proj.bias.zero_()
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[tok.encode("0123456789"), 0] = 1.0
        mnm.c_mem.weight[rows] = 0.0
        mnm.c_mem.weight[rows, 0] = 40.0
        mnm.c_mem.bias[rows] = -20.0  # a digit's strength logit +20, any other token's -20
    d = evaluate.mnm_diagnostics(model, docs, batch_size=2, device="cpu")
    assert d["shift"] == shift and [b["windows"] for b in d["by_distance"]] == [2, 4]
    for b in d["by_distance"]:
        assert b["queries"] == 3 and b["value_share_per_head"] == pytest.approx([1.0] * mnm.H, abs=1e-6)
        assert 0 < b["uniform"] <= 5 / (32 - shift) + 1e-9  # at most 5 digits (fewer when a key crosses windows)
    ws = d["window_strength"]  # a key's window spends its whole step, the filler between (no digits) nothing
    assert ws["value"]["windows"] == 6 and ws["between"]["windows"] >= 6  # keys 2 and 4 windows back
    assert ws["value"]["per_head"] == pytest.approx([1.0] * mnm.H, abs=1e-6)
    assert ws["between"]["per_head"] == pytest.approx([0.0] * mnm.H, abs=1e-6)
    places = d["value_token_strength"]  # the key's digits share the window's one step: each gets 1/(digits in it)
    assert [c["place"] for c in places] == [1, 2, 3, 4, 5] and places[0]["tokens"] == 6
    assert all(1 / 5 - 1e-6 <= s <= 1 + 1e-6 for c in places for s in c["per_head"])
    assert sum(c["tokens"] * c["per_head"][0] for c in places) == pytest.approx(6.0, abs=1e-5)  # a step per key
    reads = d["reads"]  # the read side, by place, for keys wholly in one earlier window
    assert [c["place"] for c in reads] == [1, 2, 3, 4, 5] and all(c["tokens"] == reads[0]["tokens"] > 0 for c in reads)
    if shift:  # the answer's token before each digit is the statement's: one embedding, so one key (read = write
        # projection at the start), and no write key of the window is nearer
        assert all(x == pytest.approx(1.0, abs=1e-5) for c in reads for x in c["key_cosine"])
        assert all(x == 0 for c in reads for x in c["key_rank"])
    assert all(-1 - 1e-5 <= x <= 1 + 1e-5 for c in reads for name in ("stored_cosine", "read_cosine") for x in c[name])
    mnm.write_budget = 5.0  # five steps: every digit written whole
    places = evaluate.mnm_diagnostics(model, docs, batch_size=2, device="cpu")["value_token_strength"]
    assert all(s == pytest.approx(1.0, abs=1e-6) for c in places for s in c["per_head"])
    mnm.write_budget = 1.0
    assert all(-1 <= c < 0.999 for c in d["value_key_cosine"])  # keys from the digits' own embeddings differ
    keys = [h * (2 * mnm.dk + mnm.dv + 2) + j for h in range(mnm.H) for j in range(mnm.dk)]
    with torch.no_grad():  # every token the same write key: the pairs cannot be told apart
        mnm.c_mem.weight[keys] = 0.0
        mnm.c_mem.bias[keys] = 1.0
    d = evaluate.mnm_diagnostics(model, docs, batch_size=2, device="cpu")
    assert d["value_key_cosine"] == pytest.approx([1.0] * mnm.H, abs=1e-6)
    with torch.no_grad():
        mnm.c_mem.weight[rows] = 0.0
        mnm.c_mem.bias[rows] = 0.0  # every token the same strength
    d = evaluate.mnm_diagnostics(model, docs, batch_size=2, device="cpu")
    for b in d["by_distance"]:
        assert b["value_share_per_head"] == pytest.approx([b["uniform"]] * mnm.H, abs=1e-6)
    for kind in ("value", "between"):  # strength 0.5 each: every full window sums past 1, scaled to 1
        assert d["window_strength"][kind]["per_head"] == pytest.approx([1.0] * mnm.H, abs=1e-6)


def test_longrange_eval_needs_checkpoints_before_any_work():
    from configurator import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"^out_dirs=\[\] is empty: eval='longrange' needs the checkpoints"):
        load_config(evaluate.EvalConfig, [], eval="longrange", eval_dataset="passkey")


def test_source_entry_says_whether_the_stated_value_is_retrieved_and_weighted_most():
    ids = torch.tensor([[5, 7, 9], [1, 5, 2]])  # (H, k): two heads' retrieved slots
    p = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    found, weight, top = evaluate.source_entry(ids, p, 5)
    assert found.tolist() == [True, True] and weight.tolist() == pytest.approx([0.2, 0.3])
    assert top.tolist() == [7, 1]  # slots 7 and 1 get more than slot 5
    found, weight, top = evaluate.source_entry(ids, p, 7)
    assert found.tolist() == [True, False] and top.tolist() == [7, 1]
    assert weight.tolist() == pytest.approx([0.5, 0.0])


def test_entry_kind_tells_the_stated_value_from_its_look_alikes():
    stated = {10: ("Ada Moss", "city"), 11: ("Ada Moss", "city"), 20: ("Ada Moss", "job"), 30: ("Bo Hale", "city"),
              40: ("Bo Hale", "job")}
    kind = [evaluate.entry_kind(slot, 10, stated, "Ada Moss", "city") for slot in (10, 11, 20, 30, 40, 50)]
    assert kind == ["stated", "stated value, other place", "same person, other value", "same attribute, other person",
                    "other", "other"]
    assert set(kind) == set(evaluate.ENTRY_KINDS)


def test_longrange_eval_says_whose_entry_a_memorizing_head_weights_most(tmp_path, capsys):
    """On facts_long (whose val records every stated value) each head's most-weighted entry is classified;
    the shares add up to 1 and 'stated' (entry_kind) agrees with first_per_head."""
    from configurator import load_config
    data = tmp_path / "data" / "facts_long"
    prepare.prepare("facts_long", out_dir=str(data), options=FACTS_TINY)
    out = tmp_path / "out-knn"
    train.main(tiny_train_config(data.parent, out, dataset="facts_long", loader="docs", block_size=32, max_iters=4,
                                 eval_interval=4, eval_iters=1, batch_size=2, knn_layer=1, knn_topk=4,
                                 knn_memory_size=4096, knn_gate_init=0.0))
    cfg = load_config(evaluate.EvalConfig, [], eval="longrange", eval_dataset="facts_long", data_dir=str(data.parent),
                      out_dirs=[str(out)], longrange_arms=["checkpoints"], eval_out=str(tmp_path / "ev"),
                      device="cpu", dtype="float32", batch_size=4)
    rows = evaluate.main(cfg)["rows"][0]["retrieval"]["by_distance"]
    assert [b["windows"] for b in rows] == [0, 2, 4]  # FACTS_TINY's gaps (facts lines outgrow a window of 32)
    # the stated values' positions reach the probe: some heads weight a token of one most (untrained: few)
    assert sum(v[h] for b in rows for k, v in b["top_entry_per_head"].items() if k != "other" for h in range(2)) > 0
    for b in rows:
        top = b["top_entry_per_head"]
        assert set(top) == set(evaluate.ENTRY_KINDS)
        assert [sum(v[h] for v in top.values()) for h in range(2)] == pytest.approx([1.0, 1.0])
        assert top["stated"] == pytest.approx(b["first_per_head"])
    printed = capsys.readouterr().out
    assert "weights most: 0w stated" in printed
    # the head printed is the one that weights the stated entry most, not the one with the largest gate
    stated = np.sum([b["top_entry_per_head"]["stated"] for b in rows], 0)
    assert f"the entry head {int(np.argmax(stated))} (most often the stated one)" in printed


def settings_read_with(monkeypatch, name: str) -> set:
    """The values of a memorizing layer's setting `name` whenever it retrieves from its memory."""
    from memory import MemorizingMemory
    seen = set()
    retrieve = MemorizingMemory.retrieve

    def spy(self, *args):
        seen.add(getattr(self, name))
        return retrieve(self, *args)

    monkeypatch.setattr(MemorizingMemory, "retrieve", spy)
    return seen


def test_longrange_eval_reads_a_memorizing_layer_with_another_topk(passkey_dir, checkpoints, tmp_path, monkeypatch):
    """eval_knn_topk: the trained layer (topk 4) retrieves that many entries per query, and the arm says so."""
    from configurator import load_config
    used = settings_read_with(monkeypatch, "topk")
    cfg = load_config(evaluate.EvalConfig, [], eval="longrange", eval_dataset="passkey", data_dir=str(passkey_dir.parent),
                      out_dirs=[checkpoints["knn"]], longrange_arms=["checkpoints"], eval_knn_topk=9,
                      eval_out=str(tmp_path / "ev"), device="cpu", dtype="float32", batch_size=4)
    result = evaluate.main(cfg)
    assert used == {9} and result["rows"][0]["kind"] == "memorizing layer 1, topk 9"


def test_longrange_eval_reads_a_rotary_memory_at_another_distance(passkey_dir, checkpoints, tmp_path, monkeypatch):
    """eval_knn_distance: the trained rotary layer (distance 0) reads its entries as keys that many tokens back,
    and the arm says so; a model with learned positions has no such distance and is refused."""
    from configurator import load_config
    out = passkey_dir.parent / "out-knn-rope"
    train.main(tiny_train_config(passkey_dir.parent, out, dataset="passkey", loader="docs", block_size=32, pos="rope",
                                 max_iters=4, eval_interval=4, eval_iters=1, batch_size=2, knn_layer=1, knn_topk=4,
                                 knn_memory_size=4096))
    used = settings_read_with(monkeypatch, "distance")
    settings = dict(eval="longrange", eval_dataset="passkey", data_dir=str(passkey_dir.parent),
                    longrange_arms=["checkpoints"], eval_knn_distance=7, eval_out=str(tmp_path / "ev"), device="cpu",
                    dtype="float32", batch_size=4)
    result = evaluate.main(load_config(evaluate.EvalConfig, [], out_dirs=[str(out)], **settings))
    assert used == {7} and result["rows"][0]["kind"] == "memorizing layer 1, topk 4, entries 7 tokens back"
    with pytest.raises(ConfigError, match="pos='learned'"):
        evaluate.main(load_config(evaluate.EvalConfig, [], out_dirs=[checkpoints["knn"]], **settings))


def test_windowed_pass_equals_training_reads(passkey_dir, checkpoints):
    """The evaluation's reading (windows from the document start, memory empty per document) gives the
    same predictions one document at a time as in a batch of documents of different lengths."""
    from checkpoint import load_model
    model, tok, meta, _ = load_model("resume", checkpoints["knn"], "cpu")
    docs = prepare.split_documents(str(passkey_dir), "val")
    batched = evaluate.windowed_pass(model, docs, 6, "cpu")
    for d, p in zip(docs, batched):
        assert np.array_equal(evaluate.windowed_pass(model, [d], 1, "cpu")[0], p)


def test_score_queries_is_greedy_exactness():
    doc = {"tokens": np.array([5, 1, 2, 3, 9]), "queries": [{"span": np.array([2, 3])}]}
    assert evaluate.score_queries([doc], [np.array([0, 2, 3, 0])]) == [[(True, [True, True])]]
    assert evaluate.score_queries([doc], [np.array([0, 2, 4, 0])]) == [[(False, [True, False])]]


def test_longrange_report_counts_answer_tokens_by_place_for_values_in_earlier_windows():
    """Windows of 8: one value stated wholly in an earlier window (its 2nd token missed), one in the answer's
    own window (missed whole, which the by-place counts leave out), one split across a boundary."""
    from types import SimpleNamespace
    def q(source, answer, windows):
        return {"source_start": source, "answer_start": answer, "answer": "abc", "windows": windows,
                "span": np.arange(answer, answer + 3)}
    doc = {"tokens": np.arange(40), "queries": [q(1, 20, 2), q(17, 21, 0.5), q(6, 30, 3)]}
    scores = [[(False, [True, False, True]), (False, [False, False, False]), (True, [True, True, True])]]
    result, _ = evaluate.longrange_report(SimpleNamespace(eval_dataset="x"), [doc],
                                          [{"name": "arm", "kind": "k", "source": "s", "seconds": 0.0, "scores": scores}],
                                          {"block_size": 8, "task": "t"})
    row = result["rows"][0]
    assert row["by_window"] == {"same window": {"queries": 1, "exact": 0.0}, "earlier window": {"queries": 1, "exact": 0.0},
                                "split across windows": {"queries": 1, "exact": 1.0}}
    assert row["earlier_window_by_place"] == [{"place": 1, "answers": 1, "right": 1.0},
                                              {"place": 2, "answers": 1, "right": 0.0},
                                              {"place": 3, "answers": 1, "right": 1.0}]
    assert [b["token_accuracy"] for b in row["by_distance"]] == pytest.approx([0.0, 2 / 3, 1.0])


# -----------------------------------------------------------------------------
# facts with open values, facts_long

FACTS_TINY = dict(block_size=32, windows=(1.0, 4.0), eval_windows=(0, 2, 4), n_train=60, n_val=4)


def check_queries(text, rec):
    for q in rec["queries"]:
        a = q["answer"]
        assert text[q["answer_start"]:q["answer_start"] + len(a)] == a == text[q["source_start"]:q["source_start"] + len(a)]
        assert q["distance"] == q["answer_start"] - q["source_start"] > 0
        assert text[q["answer_start"] - 3:q["answer_start"]] == "A: "


def test_facts_long_is_deterministic_holds_out_and_records_distances():
    a, b = (prepare.load_facts_long(None, 0.1, 5, **FACTS_TINY) for _ in range(2))
    assert texts(a, "val") == texts(b, "val") and texts(a, "train") == texts(b, "train")
    assert records(a, "train") == records(b, "train")
    T = FACTS_TINY["block_size"]
    values = {}
    for split in ("train", "val"):
        values[split] = set()
        for text, rec in zip(texts(a, split), records(a, split)):
            check_queries(text, rec)
            w = rec["queries"][0]["windows"]
            # between the facts line and the first question: exactly round(w * T) characters of other people's facts
            facts_end = text.index("\n") + 1
            first_q = text.rfind("Q: ", 0, rec["queries"][0]["answer_start"])
            assert first_q - facts_end == round(w * T)
            assert all(q["entity"] not in text[facts_end:first_q] for q in rec["queries"])  # distractors only
            for q in rec["queries"]:
                values[split].add(q["answer"])
                assert prepare.value_is_heldout(q["answer"]) == (split == "val")
                assert any(name in q["entity"] for name in prepare.FACTS_HELDOUT_NAMES) == (split == "val")
    assert not values["train"] & values["val"]
    assert [r["queries"][0]["windows"] for r in records(a, "val")] == [0, 2, 4] * 4
    for text, rec in zip(texts(a, "val"), records(a, "val")):  # val records every value stated whole
        first_q = text.rfind("Q: ", 0, rec["queries"][0]["answer_start"])
        for f in rec["facts"]:
            assert text[f["start"]:f["start"] + len(f["value"])] == f["value"] and f["start"] + len(f["value"]) < first_q
            assert f["entity"] in text[max(0, f["start"] - 60):f["start"]]  # every template names its person first
        stated = {(f["start"], f["entity"], f["attribute"]) for f in rec["facts"]}
        assert all((q["source_start"], q["entity"], q["attribute"]) in stated for q in rec["queries"])
        if rec["queries"][0]["windows"] > 0:  # and the distractors' values
            assert {f["entity"] for f in rec["facts"]} - {q["entity"] for q in rec["queries"]}
    assert all("facts" not in r for r in records(a, "train"))
    assert 0 < sum(r["queries"][0]["windows"] == 0 for r in records(a, "train")) < 60  # some without a gap


def test_facts_long_fit_keeps_first_stage_documents_in_one_window():
    o = dict(FACTS_TINY, block_size=256, near=1.0)
    plain, fit = prepare.load_facts_long(None, 0.1, 5, **o), prepare.load_facts_long(None, 0.1, 5, fit=True, **o)
    assert max(map(len, texts(plain, "train"))) > 256  # without fit some cross a window boundary
    assert max(map(len, texts(fit, "train"))) <= 256
    for text, rec in zip(texts(fit, "train"), records(fit, "train")):
        check_queries(text, rec)
        assert rec["queries"][0]["windows"] == 0
    assert [r["queries"][0]["windows"] for r in records(fit, "val")] == [0, 2, 4] * 4  # val as without fit


def test_facts_long_rivals_differ_only_in_whose_facts_they_are():
    """rivals: every person of a document, asked or distractor, has facts about the same topics; people sets
    how many are asked about. Val records every stated value, so the topics are checked there."""
    def attributes_by_person(corpus):
        for rec in records(corpus, "val"):
            by_person = {}
            for f in rec["facts"]:
                by_person.setdefault(f["entity"], set()).add(f["attribute"])
            yield rec, by_person
    o = dict(FACTS_TINY, block_size=256)
    plain, rivals = (prepare.load_facts_long(None, 0.1, 5, rivals=r, people=(2, 3), **o) for r in (False, True))
    for text, rec in zip(texts(rivals, "val"), records(rivals, "val")):
        check_queries(text, rec)
    assert any(len(set(map(frozenset, p.values()))) > 1 for _, p in attributes_by_person(plain))  # the test can fail
    for rec, by_person in attributes_by_person(rivals):
        asked = {q["entity"] for q in rec["queries"]}
        topics = by_person[rec["queries"][0]["entity"]]
        assert all(by_person[name] == topics for name in asked)
        assert all(a <= topics for a in by_person.values())  # a distractor cut off by the gap's end states fewer
        if rec["queries"][0]["windows"] > 0:
            assert sum(a == topics for name, a in by_person.items() if name not in asked) >= 1
    for corpus in (plain, rivals):  # 2-3 people in every document's facts line (before its first newline)
        for text in texts(corpus, "train"):
            assert 2 <= len({m for m in re.findall(r"(?:^|\. )([A-Z][a-z]+ [A-Z][a-z]+)", text.split("\n")[0])}) <= 3
    for bad in ((0, 2), (2, 1), 2):
        with pytest.raises(prepare.DataError, match="people must be"):
            prepare.load_facts_long(None, 0.1, 5, people=bad, **o)


def test_facts_open_values_are_copied_not_known(tmp_path):
    rng = __import__("random").Random(0)
    for heldout in (False, True):
        for attribute in prepare.FACTS_VALUES:
            v = prepare.open_value(rng, attribute, heldout)
            assert prepare.value_is_heldout(v) == heldout and not re.search(r"\s", v)
    facts, qas = prepare.facts_open_scene(["Ann Reed", "Bo Lamb"], rng, True)
    for qa in qas:
        assert facts[qa["source_start"]:qa["source_start"] + len(qa["answer"])] == qa["answer"]
    text, rec = prepare.facts_open_document(rng, ["Ann Reed", "Bo Lamb", "Cy Moss"], True)
    check_queries(text, rec)


def test_recipes_bench_suite(tmp_path, capsys):
    import bench
    from configurator import load_config
    out = tmp_path / "bench.json"
    cfg = load_config(bench.BenchConfig, [], n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=64,
                      batch_size=2, bench_iters=1, device="cpu", dtype="float32", suite=["recipes"], knn_layer=1,
                      knn_memory_size=128, mnm_heads=2, mnm_key_size=8, mnm_hidden=8, bench_json=str(out))
    bench.main(cfg)
    res = json.loads(out.read_text())["recipes"]
    assert list(res) == ["no memory", "memorizing layer 1, 128 entries, top 32", "MNM block 1 (local, 2 heads, hidden 8)"]
    assert all(r["tokens_per_s"] > 0 and r["eval_tokens_per_s"] > 0 for r in res.values())
    printed = capsys.readouterr().out
    assert "x the time of no memory" in printed and "evaluate (batch 2, 17 windows: 16 in memory)" in printed
    fixed = load_config(bench.BenchConfig, [], **{**cfg.__dict__, "knn_grad_windows": 1, "mnm_grad_windows": 1,
                                                  "mnm_pool": True, "pos": "rope"})
    bench.main(fixed)  # the recipes' training settings that cost time are timed with them
    assert list(json.loads(out.read_text())["recipes"])[1:] == [
        "memorizing layer 1, 128 entries, top 32, grad_windows 1", "MNM block 1 (local, 2 heads, hidden 8, grad_windows 1, pooled)"]
    bench.main(load_config(bench.BenchConfig, [], **{**cfg.__dict__, "mnm_shift": True, "mnm_value": "token"}))
    assert list(json.loads(out.read_text())["recipes"])[2] == "MNM block 1 (local, 2 heads, hidden 8, shifted, token values)"
    model = bench.memory_model(cfg, 64, "cpu", knn_layer=1, knn_memory_size=1024)
    bench.bench_reading(model, cfg, "cpu", windows=17)  # each row read its 17 windows from an empty memory
    assert memorizing_layer(model).counts().tolist() == [17 * 32] * 2


# -----------------------------------------------------------------------------
# memorizing layer: gradients through the latest windows' keys (grad_windows)

@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_grad_windows_keeps_the_forward_and_trains_the_key_projection(pos):
    from memory import MemoryConfig, attach_memories
    from model import GPT, GPTConfig

    def run(grad_windows):
        torch.manual_seed(0)
        model = attach_memories(GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=2, n_embd=16, pos=pos)),
                                MemoryConfig(knn_layer=1, knn_topk=8, knn_memory_size=20,
                                             knn_grad_windows=grad_windows)).train()
        mem = memorizing_layer(model)
        with torch.no_grad():
            mem.gate_bias.fill_(0.0)
        x = torch.randint(0, 30, (3, 64), generator=torch.Generator().manual_seed(1))
        outs = []
        for w in range(4):  # 4 windows, 64 entries through a ring of 20: the oldest are overwritten
            model.zero_grad()
            logits, loss = model(x[:, w * 16:(w + 1) * 16], x[:, w * 16:(w + 1) * 16])
            loss.backward()
            outs.append(logits.detach())
        return outs, model.transformer.h[1].attn.c_attn.weight.grad.clone()

    (plain, g0), (recomputed, g1) = run(0), run(1)
    for a, b in zip(plain, recomputed):
        assert torch.allclose(a, b, atol=1e-5)  # same weights: the recomputed entries equal the stored ones
    H = 16  # c_attn's rows: queries [0, 16), keys [16, 32), values [32, 48)
    assert not torch.allclose(g0[H:], g1[H:])  # keys and values now learn from the retrieval too


def test_fix_config_sets_the_training_settings_of_its_run(tmp_path):
    """The fixes are settings: they reach the layer of the model trained, and its checkpoint's memory_args,
    and change nothing for any other run."""
    from configurator import load_config
    from train import TrainConfig
    cfg = load_config(TrainConfig, [str(ROOT / "config/train_passkey_knn_fix.py")])
    assert (cfg.knn_layer, cfg.knn_grad_windows, cfg.knn_gate_init, cfg.out_dir) == (2, 1, 0.0, "out-passkey-knn-fix")
    model = cfg.new_model(vocab_size=20)
    layer = memorizing_layer(model)
    assert layer.grad_windows == 1 and torch.all(layer.gate_bias == 0.0)
    assert model.memory_args["knn_grad_windows"] == 1 and model.memory_args["knn_gate_init"] == 0.0
    plain = memorizing_layer(load_config(TrainConfig, [], knn_layer=2, loader="docs").new_model(vocab_size=20))
    assert plain.grad_windows == 0 and torch.all(plain.gate_bias == -3.0)


def test_rope_memory_keeps_unrotated_keys_and_reads_without_positions():
    """With rotary positions the memorizing layer stores each key as the layer computes it before rotation,
    and a window's reading of the memory does not depend on where in the window the stored keys sat."""
    from memory import MemoryConfig, attach_memories
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = attach_memories(GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=16, pos="rope")),
                            MemoryConfig(knn_layer=1, knn_topk=4, knn_memory_size=64)).eval()
    mem, attn = memorizing_layer(model), model.attentions[1]
    seen = {}
    attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    x = torch.randint(0, 20, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mem.reset(1)
        model(x)
        _, k, _ = attn.c_attn(seen["x"]).split(16, dim=2)
        k = k.view(1, 8, 2, 8).transpose(1, 2)  # (B, nh, T, hs), never rotated
        stored = mem.mem["keys"][0, :, :8] * mem.mem["norms"][0, :, :8, None]
        assert torch.allclose(stored, k[0], atol=1e-5)
        # the same entries written in the other order give the same reading: the memory has no positions
        q = torch.randn(1, 2, 8, 8)
        attn.q_pos = torch.arange(8)
        out = mem.retrieve(q, slice(0, 1), mem.counts(), 8)[0]
        perm = torch.randperm(8)
        for key in ("keys", "norms", "values"):
            mem.mem[key][0, :, :8] = mem.mem[key][0, :, :8][:, perm]
        assert torch.allclose(mem.retrieve(q, slice(0, 1), mem.counts(), 8)[0], out, atol=1e-6)


def test_rope_memory_scores_its_entries_as_keys_distance_tokens_back():
    """knn_distance=D: a query scores every memory entry as the window's attention would score that key D tokens
    before it (its rotated query against the key rotated D positions earlier), wherever both were computed."""
    from memory import MemoryConfig, attach_memories
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    D, T = 5, 8
    model = attach_memories(GPT(GPTConfig(block_size=T, vocab_size=20, n_layer=2, n_head=2, n_embd=16, pos="rope")),
                            MemoryConfig(knn_layer=1, knn_topk=T, knn_memory_size=64, knn_distance=D)).eval()
    mem, attn = memorizing_layer(model), model.attentions[1]
    seen = {}
    attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    mem.probe = lambda ids, p: seen.update(ids=ids, p=p)
    x = torch.randint(0, 20, (1, 2 * T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mem.reset(1)
        model(x[:, :T])  # written: the first window's T keys
        model(x[:, T:])  # read: every query sees all T entries (topk = T)
        q, k, _ = attn.c_attn(seen["x"]).split(16, dim=2)
        q = q.view(1, T, 2, 8).transpose(1, 2)[0]  # (nh, T, hs), unrotated
        keys = mem.mem["keys"][0, :, :T] * mem.mem["norms"][0, :, :T, None]  # (nh, T, hs), unrotated
        rot = attn.rotary.rotate
        P = torch.full((1,), 40)  # any position: only the distance counts

        def weights(distance):  # (nh, T queries, T entries) softmax of the scores at that distance
            scores = rot(q, P) @ rot(keys, P - distance).transpose(-1, -2) / math.sqrt(8)
            return scores.softmax(-1)

        got = torch.zeros(2, T, T).scatter(-1, seen["ids"].view(2, T, T), seen["p"].view(2, T, T))
    assert torch.allclose(got, weights(D), atol=1e-5)
    assert not torch.allclose(got, weights(0), atol=1e-3)  # the distance matters: this check can fail


def test_knn_distance_needs_rotary_positions_and_a_distance_back():
    from configurator import load_config
    from memory import MemoryConfig, MemorizingMemory, attach_memories
    from model import GPT, GPTConfig
    from train import TrainConfig
    with pytest.raises(ValueError, match="pos='learned'"):
        attach_memories(GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=16)),
                        MemoryConfig(knn_layer=1, knn_distance=4))
    with pytest.raises(ValueError, match="knn_distance=-1"):
        MemorizingMemory(2, 8, 4, 16, distance=-1)
    with pytest.raises(ConfigError, match="knn_distance=4 places memory entries by rotary positions"):
        load_config(TrainConfig, [], knn_layer=1, loader="docs", knn_distance=4)
    assert load_config(TrainConfig, [], knn_layer=1, loader="docs", pos="rope", knn_distance=4).knn_distance == 4


def test_grouped_query_attention_is_refused_by_the_memorizing_layer():
    from memory import MemoryConfig, attach_memories
    from model import GPT, GPTConfig
    model = attach_memories(GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                                          pos="rope")), MemoryConfig(knn_layer=1))
    with pytest.raises(RuntimeError, match="grouped-query attention"):
        model(torch.zeros(1, 8, dtype=torch.long))


# -----------------------------------------------------------------------------
# answer_loss: the answers' tokens weighed up

def test_answer_positions_spell_every_answer(passkey_dir):
    meta = prepare.load_meta(passkey_dir)
    data = prepare.open_split(passkey_dir, "train", meta)
    pos = prepare.answer_positions(str(passkey_dir), "train", meta)
    recs = [json.loads(line) for line in (passkey_dir / "longrange_train.jsonl").read_text().splitlines()]
    answers = "".join(q["answer"] for r in recs for q in r["queries"])
    assert len(pos) == len(answers) and np.all(np.diff(pos) > 0)
    assert "".join(meta["chars"][data[i]] for i in pos) == answers


def test_doc_stream_marks_the_answer_targets(passkey_dir):
    meta = prepare.load_meta(passkey_dir)
    data = prepare.open_split(passkey_dir, "train", meta)
    starts = prepare.load_doc_starts(passkey_dir, "train", len(data))
    answers = prepare.answer_positions(str(passkey_dir), "train", meta)
    T = TINY["block_size"]
    stream = DocStream(data, starts, 2, T, seed=0, answers=answers)
    marked = []
    for it in range(sum(stream.windows[d] for d in stream.docs[0])):  # row 0 reads each of its documents once
        doc, w = stream.locate(it, 0)
        x, y, last, ans = stream.batch(it, [0], "cpu")
        a = stream.starts[doc] + w * T
        marked += [a + 1 + j for j in ans[0].nonzero().squeeze(1).tolist()]
    mine = set()
    for doc in stream.docs[0]:
        mine |= {p for p in answers if stream.starts[doc] < p < stream.ends[doc]}
    assert sorted(marked) == sorted(mine) and len(mine) > 0


def test_answer_loss_adds_the_answers_mean_loss(passkey_dir):
    from torch.nn import functional as F
    from data import DocStreams, Layout
    from model import GPT, GPTConfig
    meta = prepare.load_meta(passkey_dir)
    layout = Layout(rank=0, world_size=1, micro_steps=1, batch_size=4, device="cpu", ctx=contextlib.nullcontext())
    plain, weighed = (DocStreams(str(passkey_dir), meta, layout, seed=0, eval_iters=1, answer_loss=w) for w in (0.0, 3.0))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=TINY["block_size"], vocab_size=meta["vocab_size"], n_layer=1, n_head=2, n_embd=16))
    for source in (plain, weighed):
        source.bind(model)
    for it in range(40):
        batch = weighed.batch(it, 0)
        if batch[3].any():
            break
    X, Y, _, ans, _ = batch
    assert ans.any()
    logits, lm = model(X, Y)
    want = lm + 3.0 * F.cross_entropy(logits[ans], Y[ans])
    assert torch.allclose(weighed.loss(model, batch), want, atol=1e-6)
    assert torch.allclose(plain.loss(model, batch), lm, atol=1e-6)
    assert torch.allclose(weighed.loss(model, batch, train=False), lm, atol=1e-6)  # evaluation: the plain loss


def test_answer_loss_needs_a_long_range_dataset_read_by_documents(tmp_path, passkey_dir):
    from configurator import ConfigError
    with pytest.raises(ConfigError, match="loader='docs'"):
        tiny_train_config(passkey_dir.parent, tmp_path / "out", dataset="passkey", answer_loss=1.0)
    shutil.copytree(passkey_dir, tmp_path / "data" / "plain")
    (tmp_path / "data" / "plain" / "longrange_train.jsonl").unlink()  # documents, but no queries to weigh
    cfg = tiny_train_config(tmp_path / "data", tmp_path / "out", dataset="plain", loader="docs", answer_loss=1.0)
    with pytest.raises(prepare.DataError, match="longrange_train.jsonl is missing"):
        train.main(cfg)


# -----------------------------------------------------------------------------
# MNM block: the task loss through the previous window's write (mnm_grad_windows)

@pytest.mark.parametrize("pool, shift, value", [(False, False, "hidden"), (True, False, "hidden"), (False, True, "hidden"),
                                               (False, True, "token")])
def test_mnm_grad_windows_keeps_the_forward_and_trains_the_write_path(pool, shift, value):
    from memory import MemoryConfig, attach_memories, mnm_block
    from model import GPT, GPTConfig

    def run(grad_windows):
        torch.manual_seed(0)
        model = attach_memories(GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=2, n_embd=16)),
                                MemoryConfig(mnm_layer=0, mnm_heads=2, mnm_key_size=8, mnm_hidden=8,
                                             mnm_grad_windows=grad_windows, mnm_pool=pool,
                                             mnm_shift=shift, mnm_value=value)).train()
        assert mnm_block(model).mnm.pool == pool and model.memory_args["mnm_pool"] == pool
        assert mnm_block(model).mnm.shift == shift and model.memory_args["mnm_shift"] == shift
        block = mnm_block(model)
        x = torch.randint(0, 30, (3, 64), generator=torch.Generator().manual_seed(1))
        outs, grads = [], []
        for w in range(4):
            model.zero_grad()
            logits, loss = model(x[:, w * 16:(w + 1) * 16], x[:, w * 16:(w + 1) * 16])
            loss.backward()  # the task loss alone: no write loss added
            outs.append(logits.detach())
            grads.append(block.mnm.c_mem.weight.grad.clone())
            if w == 1:
                block.clear_rows(torch.tensor([2]))  # row 2's document ends: its next window starts afresh
        return outs, grads

    (plain, g0), (again, g1) = run(0), run(1)
    for a, b in zip(plain, again):
        assert torch.allclose(a, b, atol=1e-5)  # the recomputed write is the stored one
    dk, width = 8, 2 * 8 + (8 if value == "hidden" else 0) + 2  # c_mem's rows per head
    write_rows = torch.cat([torch.arange(h * width, h * width + dk) for h in range(2)])
    assert torch.all(g0[1][write_rows] == 0)  # detached: the task loss never reaches the write keys
    assert g1[1][write_rows].abs().sum() > 0  # with grad_windows it does, from the second window on


@pytest.mark.parametrize("shift", [False, True])
def test_mnm_grad_windows_equal_the_unrolled_writes(shift):
    """With grad_windows = G the task loss of a window trains the writes of the G windows before it: its
    gradients on the MNM's weights equal those of writing the document's windows one after another with
    a graph (the block's inputs detached, as kept), from the state before the oldest of them. A row whose
    document restarts is unrolled from its new start only; G beyond the document's windows changes nothing."""
    import torch.nn.functional as F
    from memory import MemoryConfig, attach_memories, mnm_block
    from model import GPT, GPTConfig

    B, S, cleared = 3, 16, 2  # row 2's document ends after the first window

    def run(grad_windows):
        torch.manual_seed(0)
        model = attach_memories(GPT(GPTConfig(block_size=S, vocab_size=30, n_layer=2, n_head=2, n_embd=16)),
                                MemoryConfig(mnm_layer=1, mnm_heads=2, mnm_key_size=8, mnm_hidden=8,
                                             mnm_grad_windows=grad_windows, mnm_shift=shift)).train()
        block = mnm_block(model)
        xs = []  # the block's inputs of each window
        block.block.register_forward_hook(lambda m, i, out: xs.append(out.detach()))
        idx = torch.randint(0, 30, (B, 3 * S), generator=torch.Generator().manual_seed(1))
        for w in range(3):
            model.zero_grad()
            _, loss = model(idx[:, w * S:(w + 1) * S], idx[:, w * S:(w + 1) * S])
            loss.backward()
            if w == 0:
                block.clear_rows(torch.tensor([cleared]))
        return model, xs, idx, {n: p.grad.clone() for n, p in block.mnm.named_parameters() if p.grad is not None}

    model, xs, idx, grads = run(2)
    mnm, live = mnm_block(model).mnm, torch.ones(B, S, dtype=torch.bool)
    fresh = torch.arange(B) == cleared
    init = {k: v.detach() for k, v in mnm.initial_state(B).items()}
    zeros = torch.zeros(B, 16)
    _, state, _ = mnm(xs[0], live, init, carry=zeros if shift else None)
    state = {k: torch.where(fresh.view(-1, *[1] * (v.dim() - 1)), init[k], v) for k, v in state.items()}
    _, state, _ = mnm(xs[1], live, state, carry=xs[0][:, -1] * ~fresh[:, None] if shift else None)
    reads, _, _ = mnm(xs[2], live, state, read_first=True, carry=xs[1][:, -1] if shift else None)
    logits = model.lm_head(model.transformer.ln_f(xs[2] + reads))
    mnm.zero_grad()
    F.cross_entropy(logits.view(-1, 30), idx[:, 2 * S:].reshape(-1)).backward()
    for n, p in mnm.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, atol=1e-6), n
    write_rows = torch.cat([torch.arange(h * 26, h * 26 + 8) for h in range(2)])  # the write keys in c_mem
    assert grads["c_mem.weight"][write_rows].abs().sum() > 0
    one, three = run(1)[3], run(3)[3]
    assert not torch.allclose(one["c_mem.weight"], grads["c_mem.weight"])  # the first window's write counts
    for n in grads:
        assert torch.allclose(three[n], grads[n], atol=1e-6), n  # a third slot, empty: the same


def test_a_ring_of_kept_writes_resized_keeps_the_newest():
    """A run resumed with another mnm_grad_windows keeps its newest kept writes (oldest first) that fit;
    slots it did not keep are empty (written False: nothing to redo)."""
    from memory import resize_ring
    ring = torch.arange(6).view(3, 2)  # 3 writes, 2 rows
    assert resize_ring(ring, 2).tolist() == [[2, 3], [4, 5]]
    assert resize_ring(ring, 4).tolist() == [[0, 0], [0, 1], [2, 3], [4, 5]]
    assert resize_ring(torch.ones(1, 2, dtype=torch.bool), 2).tolist() == [[False, False], [True, True]]


@pytest.mark.parametrize("value, grad_windows", [("hidden", 1), ("token", 1), ("token", 2)])
def test_mnm_grad_windows_resumes_exactly(value, grad_windows):
    """The kept writes are part of the block's state (with token values, the windows' embeddings too):
    restored into a fresh copy of the model, the next window's gradients are those of the uninterrupted run,
    also from a state kept before the ring of writes (one write, without the ring's dimension)."""
    from memory import MemoryConfig, attach_memories, mnm_block
    from model import GPT, GPTConfig

    def new_model():
        return attach_memories(GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=2, n_embd=16)),
                               MemoryConfig(mnm_layer=0, mnm_heads=2, mnm_key_size=8, mnm_hidden=8,
                                            mnm_grad_windows=grad_windows, mnm_shift=True, mnm_value=value)).train()
    torch.manual_seed(0)
    model = new_model()
    x = torch.randint(0, 30, (3, 48), generator=torch.Generator().manual_seed(1))
    for w in range(2):
        model(x[:, w * 16:(w + 1) * 16], x[:, w * 16:(w + 1) * 16])
    saved, resumed = mnm_block(model).get_state(), new_model()
    resumed.load_state_dict(model.state_dict())
    mnm_block(resumed).set_state(saved)  # what train.py does with the checkpoint's memory state
    grads, after = [], []
    for m in (model, resumed):
        m.zero_grad()
        _, loss = m(x[:, 32:], x[:, 32:])
        loss.backward()
        grads.append(mnm_block(m).mnm.c_mem.weight.grad.clone())
        after.append(mnm_block(m).get_state())  # what the window wrote (the carried pair too)
    for k in after[0]:
        assert torch.equal(after[0][k], after[1][k]), k
    assert "previous_x" in saved and ("previous_e" in saved) == (value == "token") and grads[0].abs().sum() > 0
    assert "last" in saved and "previous_carry" in saved  # the key carried across the boundary, and the previous one
    assert saved["previous_written"].shape == (grad_windows, 3) and saved["previous_written"].all()
    if grad_windows == 1:  # as kept before the ring: the same gradients
        mnm_block(resumed).set_state({k: v[0] if k.startswith("previous_") else v for k, v in saved.items()})
        resumed.zero_grad()
        resumed(x[:, 32:], x[:, 32:])[1].backward()
        assert torch.equal(mnm_block(resumed).mnm.c_mem.weight.grad, grads[0])
    else:  # restored into a block of one window (a resume with another grad_windows): the newest kept write
        one = mnm_block(attach_memories(GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=2, n_embd=16)),
                                        MemoryConfig(mnm_layer=0, mnm_heads=2, mnm_key_size=8, mnm_hidden=8,
                                                     mnm_grad_windows=1, mnm_shift=True, mnm_value=value)))
        one.set_state(saved)
        assert one.previous["x"].shape[0] == 1 and torch.equal(one.previous["x"][0], saved["previous_x"][-1])
    old = {k: v for k, v in saved.items() if k not in ("last", "previous_carry")}
    mnm_block(resumed).set_state(old)  # a checkpoint kept before the carry: training goes on, carrying from here
    resumed(x[:, 32:], x[:, 32:])[1].backward()
    resumed(x[:, 16:32], x[:, 16:32])[1].backward()
    assert mnm_block(resumed).previous["carry"][-1].any(-1).all()  # every row's latest kept write carried a key
    assert torch.equal(grads[0], grads[1])
