import math
import os
from dataclasses import replace

import pytest
import torch

from knn import KNNAttention, KNNMemory, KNNMemoryError, KNNSettings, TorchIndex, FaissIndex
from model import GPT, GPTConfig

VOCAB = 40


class Tok:
    """A toy tokenizer: characters a.. map to ids, '\\n' is id 0 (the bookkeeping token)."""

    def encode(self, text):
        return [0 if c == "\n" else 1 + (ord(c) - 97) % (VOCAB - 1) for c in text]


TOK, META = Tok(), {"tokenizer": "toy"}


def tiny(seed=0, n_layer=3, block_size=24, arch="gpt2"):
    """A random GPT-2-shaped model, or (arch='llama') a Llama-shaped one: RMSNorm, SwiGLU, rotary
    embeddings and grouped-query attention (4 query heads share 2 key/value heads). The Llama's
    attention weights are drawn wide, so that its attention is far from uniform and positions matter
    (a rotation done wrong shows)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        return GPT(GPTConfig(block_size=block_size, vocab_size=VOCAB, n_layer=n_layer, n_head=2, n_embd=16)).eval()
    model = GPT(GPTConfig(block_size=block_size, vocab_size=VOCAB, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32,
                          bias=False, norm="rmsnorm", pos="rope", rope_theta=100.0, mlp="swiglu", mlp_hidden=48))
    with torch.no_grad():
        for attn in model.attentions:
            attn.c_attn.weight.normal_(0.0, 0.25)
    return model.eval()


ARCHS = ["gpt2", "llama"]


def settings(**kw):
    base = dict(knn=[0, 3, 0], bookkeeping_frac=0.0, mem_frac=0.0, knn_softmax_influence=1.0, resid_frac=0.0)
    base.update(kw)
    return KNNSettings(**base)


TEXT = "the quick brown fox jumps over the lazy dog and then naps in the warm afternoon sun"

# the reference's three types, with gates opened far enough that a random tiny model uses the memory
TYPES = {
    "type1": dict(resid_only=False, resid_frac=0.0, knn_softmax_influence=1.0, mem_frac=0.0),
    "type2": dict(resid_only=True, resid_frac=0.1, knn_softmax_influence=1000.0, mem_frac=0.0),
    "type3": dict(resid_only=False, resid_frac=0.33, knn_softmax_influence=0.01, mem_frac=5.0),
    # gates half open (attention of a random model is ~1/T): some heads and positions pass, some not
    "gated": dict(resid_only=False, resid_frac=0.33, knn_softmax_influence=1.0, mem_frac=1.0, bookkeeping_frac=0.06),
}


def build(model, s, texts=(TEXT,)):
    mem = KNNMemory.create(model, s, META, TOK)
    for t in texts:
        mem.add_text(model, TOK, t)
    return mem


def rotate_by_hand(x, pos: int, theta: float):
    """RoPE of one vector x (d,) to position pos (Llama's layout: dimension i pairs with i + d/2)."""
    d = x.numel()
    out = x.clone()
    for i in range(d // 2):
        a = pos * theta ** (-2 * i / d)
        out[i] = x[i] * math.cos(a) - x[i + d // 2] * math.sin(a)
        out[i + d // 2] = x[i + d // 2] * math.cos(a) + x[i] * math.sin(a)
    return out


def reference_hook(mem: KNNMemory, layer: int, k: int):
    """The method written out line by line, one batch row, head and position at a time, with a
    brute-force nearest-neighbour search and attention computed by hand. Reference mode: the last
    row decides for every query; causal mode (knn_recompute=False): every row decides for itself.
    With grouped-query attention query head h reads key/value head h // g and searches its store;
    with rotary embeddings the positions are chosen with the rotated (real) attention, and search
    and mixing use the vectors unrotated (the store holds unrotated keys)."""
    s = mem.settings
    keys, values = mem.keys[layer], mem.values[layer]

    def softmax(xs):
        mx = max(xs)
        ex = [math.exp(x - mx) for x in xs]
        return [e / sum(ex) for e in ex]

    def replaced_values(attn, q, kc, v, b, h, t, mix_own_query):
        """Values of positions 0..t as query head h reads them after the memory, as row t decides."""
        d = q.size(-1)
        hk = h // (q.size(1) // kc.size(1))
        unrot = (lambda x, pos: rotate_by_hand(x, -pos, attn.rotary.theta)) if attn.rotary else (lambda x, pos: x)
        att = softmax([float(q[b, h, t] @ kc[b, hk, j]) / math.sqrt(d) for j in range(t + 1)])
        V = v[b, hk, : t + 1].clone()
        for j in range(t + 1):
            if j == 0:
                use = att[0] > s.bookkeeping_frac
            else:
                use = s.mem_frac > 0 and att[j] >= 1.0 / (s.mem_frac * (t + 1))
            if not use:
                continue
            key_j = unrot(kc[b, hk, j], j)
            probe = key_j if s.knn_query == "key" else unrot(q[b, h, t], t)
            if s.knn_metric == "l2":
                score = [-float(((probe - keys[hk, n]) ** 2).sum()) for n in range(keys.size(1))]
            else:
                score = [float(probe @ keys[hk, n]) for n in range(keys.size(1))]
            nearest = sorted(range(len(score)), key=lambda n: -score[n])[:k]
            cands = [(keys[hk, n], values[hk, n]) for n in nearest]
            if not s.resid_only:
                cands.append((key_j, v[b, hk, j]))
            mix_q = unrot(q[b, h, j], j) if s.knn_query == "key" and mix_own_query else unrot(q[b, h, t], t)
            ws = softmax([s.knn_softmax_influence * float(mix_q @ ck) / math.sqrt(d) for ck, _ in cands])
            m = sum(w * cv for w, (_, cv) in zip(ws, cands))
            V[j] = (1 - s.resid_frac) * m + s.resid_frac * v[b, hk, j] if s.resid_frac > 0 else m
        return att, V

    def hook(attn, q, kc, v, attend):
        B, H, T, d = q.shape
        y = torch.zeros_like(q)
        for b in range(B):
            for h in range(H):
                hk = h // (H // kc.size(1))
                if s.knn_recompute:
                    _, V = replaced_values(attn, q, kc, v, b, h, T - 1, mix_own_query=True)
                    for t in range(T):
                        att = softmax([float(q[b, h, t] @ kc[b, hk, j]) / math.sqrt(d) for j in range(t + 1)])
                        y[b, h, t] = sum(a * V[j] for j, a in enumerate(att))
                else:
                    for t in range(T):
                        att, V = replaced_values(attn, q, kc, v, b, h, t, mix_own_query=False)
                        y[b, h, t] = sum(a * V[j] for j, a in enumerate(att))
        return y

    hook.recompute = s.knn_recompute
    return hook


# every type x search mode x cache mode with L2; inner product (it only changes the search) on two of them
CASES = [(kind, query, "l2", recompute) for kind in sorted(TYPES) for query in ("key", "query")
         for recompute in (True, False)] + [("gated", "key", "ip", True), ("type1", "query", "ip", False)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind,query,metric,recompute", CASES, ids=lambda x: str(x))
def test_fast_path_equals_line_by_line_reference(kind, query, metric, recompute, arch):
    model = tiny(arch=arch)
    s = settings(**{"knn": [0, 3, 2], "knn_query": query, "knn_metric": metric, "knn_recompute": recompute,
                    **TYPES[kind]})
    mem = build(model, s)
    idx = torch.tensor([TOK.encode("\nthe lazy fox naps"), TOK.encode("\nwarm sun over dog")])
    with torch.no_grad():
        plain, _ = model(idx, targets=idx)
        mem.attach(model)
        fast, _ = model(idx, targets=idx)
        for L in (1, 2):
            model.attentions[L].memory = reference_hook(mem, L, s.knn[L])
        slow, _ = model(idx, targets=idx)
    assert (fast - slow).abs().max().item() < 1e-4
    assert (fast - plain).abs().max().item() > 1e-3  # the memory really acted


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recompute", [True, False], ids=["reference", "causal"])
def test_cached_generation_equals_recomputation(recompute, arch):
    model = tiny(seed=1, arch=arch)
    build(model, settings(knn=[0, 3, 2], knn_recompute=recompute, **{**TYPES["type1"], "mem_frac": 5.0})).attach(model)
    idx = torch.tensor([TOK.encode("\nthe quick"), TOK.encode("\nlazy dogs")])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]
    for temperature in (0.0, 1.0):  # greedy, and sampling with the same per-row generators
        cached = model.generate(idx, 30, temperature=temperature, generators=gens(), use_cache=True)
        recomputed = model.generate(idx, 30, temperature=temperature, generators=gens(), use_cache=False)
        assert torch.equal(cached, recomputed)  # 10 + 30 tokens: runs past block_size 24 too
    with torch.no_grad():  # the memory acts on these sequences (a random tiny model's logits are flat,
        # so it seldom changes which token is sampled: compare logits)
        crop = cached[:, -24:]
        assert (model(crop, targets=crop)[0] - tiny(seed=1, arch=arch)(crop, targets=crop)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recompute", [True, False], ids=["reference", "causal"])
def test_batch_rows_equal_separate_runs(arch, recompute):
    model = tiny(seed=2, arch=arch)
    build(model, settings(knn_recompute=recompute, **TYPES["type1"])).attach(model)
    prompts = [TOK.encode("\nthe fox"), TOK.encode("\nnaps in"), TOK.encode("\nwarm da")]
    gens = lambda seeds: [torch.Generator().manual_seed(x) for x in seeds]
    batch = model.generate(torch.tensor(prompts), 12, temperature=1.0, generators=gens([1, 2, 3]))
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), 12, temperature=1.0, generators=gens([i + 1]))
        assert torch.equal(batch[i], alone[0])


def test_resid_frac_one_equals_no_memory_exactly():
    model = tiny(seed=3)
    idx = torch.tensor([TOK.encode("\nthe quick brown fox")])
    with torch.no_grad():
        plain, _ = model(idx, targets=idx)
        build(model, settings(knn=[0, 3, 3], resid_frac=1.0, mem_frac=5.0)).attach(model)
        with_mem, _ = model(idx, targets=idx)
    assert torch.equal(plain, with_mem)


@pytest.mark.parametrize("arch", ARCHS)
def test_long_text_is_streamed_in_windows_and_build_is_clean(arch):
    model = tiny(seed=4, block_size=12, arch=arch)
    s = settings(knn=[0, 3, 2])
    text = TEXT * 2  # 170 tokens, windows of 11 tokens + bookkeeping
    mem = build(model, s, [text])
    tokens = TOK.encode(text)
    assert len(mem) == len(tokens) and mem.documents[0]["n_tokens"] == len(tokens)
    # the entries of the third window are what a lone forward pass of "\n" + that chunk gives
    chunk = [0] + tokens[22:33]
    seen = {}
    model.attentions[2].memory = lambda a, q, k, v, attend: seen.setdefault("kv", (k, v)) and attend(q, k, v)
    with torch.no_grad():
        model(torch.tensor([chunk]))
    model.attentions[2].memory = None
    k, v = seen["kv"]
    if arch == "llama":  # stored before the rotary embedding, one store per key/value head
        assert mem.keys[2].shape[0] == 2 and k.shape[1] == 2
        k = model.attentions[2].rotary.rotate(k, -torch.arange(12))
    assert torch.allclose(mem.keys[2][:, 22:33], k[0, :, 1:], atol=1e-6)
    assert torch.allclose(mem.values[2][:, 22:33], v[0, :, 1:], atol=1e-6)
    # building while a memory is attached does not retrieve from it (clean build)
    other = build(model, s, ["zzzz yyyy"])
    other.attach(model)
    again = build(model, s, [text])
    assert torch.equal(again.keys[2], mem.keys[2]) and torch.equal(again.values[1], mem.values[1])


def test_grow_then_remove_equals_never_adding():
    model = tiny(seed=5)
    s = settings(**TYPES["type1"])
    one = build(model, s, [TEXT])
    two = build(model, s, [TEXT])
    extra = two.add_text(model, TOK, "completely different words about cheese")
    assert len(two) > len(one)
    two.remove(extra)
    assert len(two) == len(one) and [d["text"] for d in two.documents] == [TEXT]
    for L in one.layers:
        assert torch.equal(one.keys[L], two.keys[L]) and torch.equal(one.values[L], two.values[L])
    idx = torch.tensor([TOK.encode("\nthe fox")])
    one.attach(model)
    a = model.generate(idx, 10, temperature=0)
    two.attach(model)
    assert torch.equal(a, model.generate(idx, 10, temperature=0))
    two.clear()
    assert len(two) == 0 and two.documents == []
    with pytest.raises(KNNMemoryError, match="no document 7"):
        two.remove(7)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["torch", "faiss-flat"])
def test_save_load_round_trip_gives_identical_generations(tmp_path, backend, arch):
    model = tiny(seed=6, arch=arch)
    s = settings(knn_backend=backend, **TYPES["type3"])
    mem = build(model, s, [TEXT, "a second document"])
    mem.attach(model)
    idx = torch.tensor([TOK.encode("\nthe quick")])
    before = model.generate(idx, 15, temperature=0)
    mem.save(tmp_path / "mem")
    KNNMemory.detach(model)
    loaded = KNNMemory.load(tmp_path / "mem", model, s)
    assert [d["text"] for d in loaded.documents] == [TEXT, "a second document"]
    assert torch.equal(loaded.doc_ids, mem.doc_ids)
    if backend != "torch":
        assert set(loaded._indexes) == set(mem.layers)  # the faiss index files were read, not rebuilt
    loaded.attach(model)
    assert torch.equal(before, model.generate(idx, 15, temperature=0))


def test_memory_of_another_model_is_refused(tmp_path):
    s = settings()
    build(tiny(seed=7), s).save(tmp_path / "mem")
    other = tiny(seed=8)
    with pytest.raises(KNNMemoryError, match="built by another model"):
        KNNMemory.load(tmp_path / "mem", other, s)
    assert len(KNNMemory.load(tmp_path / "mem", other, s, force=True)) == len(TOK.encode(TEXT))
    bigger = GPT(GPTConfig(block_size=24, vocab_size=VOCAB, n_layer=3, n_head=4, n_embd=16))
    with pytest.raises(KNNMemoryError, match="heads"):
        KNNMemory.load(tmp_path / "mem", bigger, s, force=True)


def test_gpt2_and_llama_memories_are_not_interchangeable(tmp_path):
    """Same layer count, heads and head size, so only the fingerprint (which covers the architecture) tells a
    GPT-2-shaped model from a Llama-shaped one; a grouped-query model's memory has fewer stored heads."""
    s = settings()
    gpt2 = tiny(seed=7)
    llama = GPT(GPTConfig(block_size=24, vocab_size=VOCAB, n_layer=3, n_head=2, n_embd=16, bias=False,
                          norm="rmsnorm", pos="rope", mlp="swiglu")).eval()
    build(gpt2, s).save(tmp_path / "gpt2")
    build(llama, s).save(tmp_path / "llama")
    with pytest.raises(KNNMemoryError, match="built by another model"):
        KNNMemory.load(tmp_path / "gpt2", llama, s)
    with pytest.raises(KNNMemoryError, match="built by another model"):
        KNNMemory.load(tmp_path / "llama", gpt2, s)
    assert len(KNNMemory.load(tmp_path / "llama", llama, s)) == len(TOK.encode(TEXT))
    gqa = tiny(seed=7, arch="llama")  # 4 query heads, 2 key/value heads of 8
    build(gqa, s).save(tmp_path / "gqa")
    assert KNNMemory.load(tmp_path / "gqa", gqa, s).keys[1].shape == (2, len(TOK.encode(TEXT)), 8)
    wide = GPT(GPTConfig(block_size=24, vocab_size=VOCAB, n_layer=3, n_head=4, n_embd=32)).eval()  # 4 kv heads of 8
    with pytest.raises(KNNMemoryError, match="2 key/value heads of size 8"):
        KNNMemory.load(tmp_path / "gqa", wide, s, force=True)


def test_damaged_folders_give_clear_errors(tmp_path):
    model = tiny(seed=9)
    s = settings()
    mem = build(model, s)
    with pytest.raises(KNNMemoryError, match="no manifest.json"):
        KNNMemory.load(tmp_path / "nothing", model, s)
    mem.save(tmp_path / "mem")
    kv = tmp_path / "mem" / "keys.1.npy"
    kv.write_bytes(kv.read_bytes()[:150])
    with pytest.raises(KNNMemoryError, match="corrupt|damaged"):
        KNNMemory.load(tmp_path / "mem", model, s)
    mem.save(tmp_path / "mem")
    (tmp_path / "mem" / "manifest.json").write_text('{"format_version": 1, "kind": ')
    with pytest.raises(KNNMemoryError, match="corrupt"):
        KNNMemory.load(tmp_path / "mem", model, s)


def test_interrupted_save_keeps_the_previous_memory(tmp_path, monkeypatch):
    model = tiny(seed=10)
    s = settings()
    mem = build(model, s)
    mem.save(tmp_path / "mem")
    mem.add_text(model, TOK, "more text that should not land")
    import knn

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(knn.Column, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        mem.save(tmp_path / "mem")
    monkeypatch.undo()
    assert len(KNNMemory.load(tmp_path / "mem", model, s)) == len(TOK.encode(TEXT))
    # a crash between the two renames of a save: the old folder is found under path.old
    os.rename(tmp_path / "mem", tmp_path / "mem.old")
    assert len(KNNMemory.load(tmp_path / "mem", model, s)) == len(TOK.encode(TEXT))


def test_bad_settings_are_refused():
    model = tiny()
    with pytest.raises(KNNMemoryError, match="one k per layer"):
        KNNMemory.create(model, settings(knn=[0, 3]), META, TOK)
    with pytest.raises(KNNMemoryError, match="knn_backend"):
        KNNMemory.create(model, settings(knn_backend="annoy"), META, TOK)
    mem = build(model, settings(knn=[0, 3, 0]))
    mem.settings.knn = [0, 3, 3]
    with pytest.raises(KNNMemoryError, match="holds layers"):
        mem.attach(model)


def _random_store(H=3, N=2000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(H, N, d, generator=g)
    heads = torch.randint(0, H, (50,), generator=g)
    vecs = torch.randn(50, d, generator=g)
    return keys, heads, vecs


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_torch_search_is_exact(metric):
    keys, heads, vecs = _random_store()
    ids = TorchIndex(keys, metric).search(heads, vecs, 5)
    for m in range(len(heads)):
        kh = keys[heads[m]]
        score = -((kh - vecs[m]) ** 2).sum(-1) if metric == "l2" else kh @ vecs[m]
        assert ids[m].tolist() == score.topk(5).indices.tolist()


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("kind", ["faiss-flat", "faiss-ivf"])
def test_exact_faiss_backends_match_exact_search(metric, kind):
    keys, heads, vecs = _random_store()
    exact = TorchIndex(keys, metric).search(heads, vecs, 5)
    # IVF searching all of its lists is exact too
    got = FaissIndex(keys, metric, kind, nlist=16, nprobe=16, pq_m=4).search(heads, vecs, 5)
    assert torch.equal(torch.sort(got, 1).values, torch.sort(exact, 1).values)


def test_ivfpq_is_a_good_approximation():
    keys, heads, vecs = _random_store(N=4000)
    exact = TorchIndex(keys, "l2").search(heads, vecs, 10)
    approx = FaissIndex(keys, "l2", "faiss-ivfpq", nlist=16, nprobe=16, pq_m=8).search(heads, vecs, 10)
    recall = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact)) / exact.numel()
    assert 0.3 < recall <= 1.0
    with pytest.raises(KNNMemoryError, match="needs at least"):
        FaissIndex(keys[:, :10], "l2", "faiss-ivf", nlist=16, nprobe=1, pq_m=8)


def test_memory_layer_hook_and_cache_mode():
    model = tiny()
    build(model, settings()).attach(model)
    assert isinstance(model.attentions[1].memory, KNNAttention) and model.attentions[1].memory.recompute
    assert model.attentions[0].memory is None and model.attentions[2].memory is None
    build(model, settings(knn_recompute=False)).attach(model)
    assert not model.attentions[1].memory.recompute  # causal: generate keeps the ordinary KV cache


def test_auto_backend_follows_the_measured_rule():
    model = tiny()
    mem = build(model, settings(knn_backend="auto", mem_frac=0.0))
    assert mem.backend == "torch"  # small
    d = mem.head_size
    mem.add_entries({L: torch.randn(2, 4000, d) for L in mem.layers}, {L: torch.randn(2, 4000, d) for L in mem.layers})
    assert mem.backend == "faiss-flat"  # large, one query per head
    mem.settings.mem_frac = 5.0
    assert mem.backend == "torch"  # many queries per head


OTHERS = ("a red kite flew over misty hills at dawn while crows watched", "seven silver spoons sat in a drawer")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("recompute", [False, True])
def test_knn_documents_reads_only_the_document_the_context_matches(arch, recompute):
    """A memory of three documents with knn_documents=1, asked with the start of the second: it chooses the
    second and generates exactly what a memory holding only that document does; reading all three differs."""
    model = tiny(seed=5, arch=arch)
    s = settings(knn=[0, 3, 3], knn_documents=1, knn_recompute=recompute, mem_frac=5.0)
    three = build(model, s, (TEXT,) + OTHERS)
    alone = build(model, replace(s, knn_documents=0), OTHERS[:1])
    prompt = torch.tensor([TOK.encode("\n" + OTHERS[0][:14])])
    with torch.no_grad():
        three.attach(model)
        chose = model.generate(prompt, 8, temperature=0)
        picked = set(three.doc_ids[three.selection[0]].tolist())
        logits_chosen = model(prompt)[0]
        three.settings = replace(s, knn_documents=0)
        three.attach(model)
        logits_all = model(prompt)[0]
        alone.attach(model)
        assert torch.equal(model.generate(prompt, 8, temperature=0), chose)
        assert torch.equal(model(prompt)[0], logits_chosen)
    KNNMemory.detach(model)
    assert picked == {1}
    assert not torch.allclose(logits_all, logits_chosen)


def test_knn_documents_chooses_per_row():
    """Rows asking about different documents choose each their own; a row equals its run alone."""
    model = tiny(seed=6, arch="llama")
    mem = build(model, settings(knn=[0, 3, 3], knn_documents=1, knn_recompute=False), (TEXT,) + OTHERS)
    mem.attach(model)
    prompts = [TOK.encode("\n" + t[:12]) for t in (OTHERS[1], TEXT)]
    with torch.no_grad():
        both = model.generate(torch.tensor(prompts), 6, temperature=0)
        assert [set(mem.doc_ids[p].tolist()) for p in mem.selection] == [{2}, {0}]
        for row, p in enumerate(prompts):
            assert torch.equal(model.generate(torch.tensor([p]), 6, temperature=0)[0], both[row])
    KNNMemory.detach(model)
    one = build(model, mem.settings)  # a single document: nothing to choose, the ordinary search runs
    one.attach(model)
    with torch.no_grad():
        model(torch.tensor(prompts))
    assert one.selection == [None, None]
    KNNMemory.detach(model)
    with pytest.raises(KNNMemoryError, match="knn_documents=-1 must be >= 0"):
        settings(knn_documents=-1).check(3)
    mem.shard = (0, 2)  # a process's share of a sharded memory cannot vote for documents it does not hold
    with pytest.raises(KNNMemoryError, match="knn_documents needs every document's entries on every process"):
        mem.attach(model)
