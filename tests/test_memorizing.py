"""The Memorizing Transformer layer, the document-contiguous loader, and kNN-LM."""
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import train
from conftest import tiny_train_config, torchrun_train
from knn import KNNLM, KNNLMDatastore, KNNMemoryError, KNNSettings, knnlm_log_probs, last_mlp_input
from memory import MemoryConfig, MemorizingMemory, attach_memories, generate_any, memorizing_layer, mnm_block
from checkpoint import load_checkpoint, memory_args, model_args, model_from_checkpoint
from data import DocStream
from prepare import split_documents
from model import GPT, GPTConfig


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=16)
    cfg.update(kw)
    mem = {k: cfg.pop(k) for k in list(cfg) if k in MemoryConfig.__dataclass_fields__}
    return attach_memories(GPT(GPTConfig(**cfg)), MemoryConfig(**mem)).eval()


def windows(model, x):
    """Logits of every position of x (B, n * block_size), read window after window like training."""
    T = model.config.block_size
    return torch.cat([model(x[:, i:i + T], x[:, i:i + T])[0] for i in range(0, x.size(1), T)], 1)


def test_gate_zero_equals_plain_model():
    mem_model = tiny_gpt(knn_layer=1, knn_topk=4, knn_memory_size=40)
    plain = tiny_gpt(seed=1)
    state = {k: v for k, v in mem_model.state_dict().items() if "memory" not in k}
    plain.load_state_dict(state)  # the same weights, no memorizing layer
    x = torch.randint(0, 50, (3, 64))
    with torch.no_grad():
        memorizing_layer(mem_model).gate_bias.fill_(float("-inf"))  # sigmoid(-inf) = 0: the memory is shut
        shut = windows(mem_model, x)
        assert memorizing_layer(mem_model).counts().tolist() == [40, 40, 40]  # it did read and write
        assert torch.equal(shut, windows(plain, x))
        memorizing_layer(mem_model).reset()
        memorizing_layer(mem_model).gate_bias.fill_(0.0)  # open: the memory changes later windows only
        opened = windows(mem_model, x)
    assert torch.equal(opened[:, :16], shut[:, :16])  # nothing in memory during the first window
    assert not torch.allclose(opened[:, 16:], shut[:, 16:])


@pytest.mark.parametrize("pos,scale", [("learned", None), ("rope", None), ("rope", (0.7, -0.4))])
def test_joint_mix_is_one_softmax_over_window_and_memory(pos, scale):
    """knn_mix='joint': each head's output equals one softmax over the memory's entries (all of them
    retrieved: topk >= entries; unrotated query and keys with rope) and the window's causal keys
    together, computed naively here; the gate's logit adds to the memory's scores, after knn_learn_scale's
    per-head factor (exp(0.7) for head 0, exp(-0.4) for head 1) multiplied them."""
    model = tiny_gpt(knn_layer=1, knn_topk=64, knn_memory_size=64, knn_mix="joint", pos=pos,
                     knn_learn_scale=scale is not None)
    mem = memorizing_layer(model)
    factor = torch.tensor(scale or (0.0, 0.0)).exp().view(1, 2, 1, 1)
    if scale is not None:
        with torch.no_grad():
            mem.score_scale.copy_(torch.tensor(scale))
    attn = model.attentions[1]
    x = torch.randint(0, 50, (2, 32))
    with torch.no_grad():
        model(x[:, :16], x[:, :16])  # the first window fills the memory (16 entries per row and head)
        keys = mem.mem["keys"][:, :, :16] * mem.mem["norms"][:, :, :16, None]  # (B, H, 16, d) unrotated
        values = mem.mem["values"][:, :, :16]
        for bias in (0.0, 1.5):
            mem.gate_bias.fill_(bias)
            seen = {}
            hook = attn.c_attn.register_forward_hook(lambda m, a, out: seen.update(qkv=out))
            mem.write = False  # the memory keeps the first window only
            model(x[:, 16:], x[:, 16:])
            hook.remove()
            B, T, C = seen["qkv"].shape[0], 16, 16
            q, k, v = (t.view(B, T, 2, 8).transpose(1, 2) for t in seen["qkv"].split(C, dim=2))
            q_loc, k_loc = (attn.rotary.rotate(t, torch.arange(T)) for t in (q, k)) if pos == "rope" else (q, k)
            local = (q_loc @ k_loc.transpose(-1, -2)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
            scores = torch.cat([(q @ keys.transpose(-1, -2)) * factor + bias * 8 ** 0.5, local], -1) / 8 ** 0.5
            want = scores.softmax(-1) @ torch.cat([values, v], 2)  # (B, H, T, d)
            got = mem(attn, q_loc, k_loc, v, attn.attend)
            assert torch.allclose(got, want, atol=1e-5)


def test_joint_mix_with_an_empty_memory_is_the_plain_attention():
    model = tiny_gpt(knn_layer=1, knn_topk=4, knn_memory_size=40, knn_mix="joint")
    attn = model.attentions[1]
    q, k, v = torch.randn(3, 2, 16, 8).unbind(0)
    with torch.no_grad():
        want = attn.attend(q[None], k[None], v[None])
        assert torch.allclose(memorizing_layer(model)(attn, q[None], k[None], v[None], attn.attend), want, atol=1e-6)
    with pytest.raises(ValueError, match="knn_mix='sum'"):
        tiny_gpt(knn_layer=1, knn_mix="sum")


def test_bfloat16_search_retrieves_what_float32_does():
    """knn_search_dtype only changes the precision retrieval ranks in: a query near a stored key (closer
    than bf16's rounding could blur) retrieves that entry in both dtypes."""
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(2, 3, 64, 16, generator=g), dim=-1)  # (B, H, C, d): 64 entries per row, head
    values = torch.randn(2, 3, 64, 16, generator=g)
    pick = torch.randint(0, 64, (2, 3, 10), generator=g)  # the entries queried
    q = torch.gather(keys, 2, pick[..., None].expand(-1, -1, -1, 16)) + 0.05 * torch.randn(2, 3, 10, 16, generator=g)
    out = {}
    for dtype in ("float32", "bfloat16"):
        mem = MemorizingMemory(n_head=3, head_size=16, topk=1, size=64, search_dtype=dtype)
        mem.reset(2)
        mem._alloc(2, torch.zeros(1))
        mem.append(torch.arange(2), keys, values)
        out[dtype] = mem.retrieve(q, slice(0, 2), mem.counts(), 64)[0]  # top-1: the retrieved entry's value
    assert torch.equal(out["float32"], torch.gather(values, 2, pick[..., None].expand(-1, -1, -1, 16)))
    assert torch.equal(out["bfloat16"], out["float32"])
    with pytest.raises(ValueError, match="knn_search_dtype"):
        tiny_gpt(knn_layer=1, knn_search_dtype="float16")


def test_memory_is_not_a_parameter_or_buffer():
    model = tiny_gpt(knn_layer=2)
    windows(model, torch.randint(0, 50, (2, 32)))
    keys = [k for k in model.state_dict() if "memory" in k]
    assert keys == ["transformer.h.2.attn.memory.gate_bias"]
    assert not list(model.buffers())  # so DDP's broadcast_buffers has nothing of the memory to send
    assert 0 < torch.sigmoid(memorizing_layer(model).gate_bias[0]) < 0.1  # small but open at init


def test_fifo_eviction_at_capacity():
    mem = MemorizingMemory(n_head=1, head_size=2, topk=1, size=5)
    mem.reset(2)
    mem._alloc(2, torch.zeros(1))
    # entries t = 0..11 with key direction (cos t, sin t)-like distinct values and value t
    for start in range(0, 12, 3):
        t = torch.arange(start, start + 3, dtype=torch.float)
        k = torch.stack([t + 1, torch.ones(3)], -1).expand(2, 1, 3, 2)  # (B, H, T, d)
        mem.append(torch.arange(2), k, t[None, None, :, None].expand(2, 1, 3, 2))
    assert mem.counts().tolist() == [5, 5]
    held = sorted(mem.mem["values"][0, 0, :, 0].tolist())
    assert held == [7.0, 8.0, 9.0, 10.0, 11.0]  # the 5 newest, the oldest evicted
    # retrieval: a query in the direction of entry 9's key finds it (top-1), not an evicted one
    q = torch.tensor([10.0, 1.0]).expand(2, 1, 1, 2)
    y = mem.retrieve(q, slice(0, 2), mem.counts(), 5)[0]
    assert y[0, 0, 0].tolist() == [9.0, 9.0]


def test_batch_rows_are_independent():
    model = tiny_gpt(knn_layer=1, knn_topk=4, knn_memory_size=24)
    x = torch.randint(0, 50, (3, 64))
    with torch.no_grad():
        memorizing_layer(model).gate_bias.fill_(0.0)
        batched = windows(model, x)
        for b in range(3):
            memorizing_layer(model).reset()
            assert torch.allclose(windows(model, x[b:b + 1]), batched[b:b + 1], atol=1e-5)


@pytest.mark.parametrize("mix", ["gate", "joint"])
def test_cached_generation_equals_recomputation_over_long_prompt(mix):
    model = tiny_gpt(knn_layer=1, knn_topk=4, knn_memory_size=100, knn_mix=mix)
    memorizing_layer(model).gate_bias.data.fill_(0.0)
    prompt = torch.randint(0, 50, (2, 37))  # two full windows go to memory before generating
    cached = generate_any(model, prompt, 30, temperature=0, use_cache=True)
    recomputed = generate_any(model, prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)
    # the memory matters: shut it and the continuation changes
    memorizing_layer(model).gate_bias.data.fill_(float("-inf"))
    assert not torch.equal(generate_any(model, prompt, 30, temperature=0), cached)


def test_mnm_cached_generation_equals_recomputation_over_long_prompt():
    model = tiny_gpt(mnm_layer=1, mnm_heads=2, mnm_key_size=8, mnm_hidden=16)
    block = mnm_block(model)
    with torch.no_grad():
        block.mnm.c_proj.weight.normal_(0, 1.0)  # loud reads, so what the memory holds steers the tokens
    prompt = torch.randint(0, 50, (2, 37))  # two full windows are written before generating
    cached = generate_any(model, prompt, 30, temperature=0, use_cache=True)
    assert torch.equal(cached, generate_any(model, prompt, 30, temperature=0, use_cache=False))
    alone = generate_any(model, prompt[1:], 30, temperature=0)
    assert torch.equal(alone[0], cached[1])  # each row has its own fast weights
    assert block.state is None  # the training state is put back
    # the memory matters: other earlier windows change the predictions of the same last window
    with torch.no_grad():
        logits = []
        for earlier in (prompt[:, :32], torch.randint(0, 50, (2, 32))):
            block.reset()
            windows(model, earlier)
            logits.append(model(prompt[:, 32:])[0])
        block.reset()
    assert not torch.allclose(logits[0], logits[1])


# -----------------------------------------------------------------------------
# document-contiguous training

@pytest.fixture(scope="module")
def plays_data(tmp_path_factory, shared_data):
    from prepare import prepare
    data_dir = tmp_path_factory.mktemp("data")
    prepare("shakespeare_plays", input=str(shared_data / "shakespeare" / "input.txt"),
            out_dir=str(data_dir / "shakespeare_plays"))
    return data_dir


@pytest.mark.needs_data("shakespeare/input.txt")
def test_plays_are_documents(plays_data):
    d = plays_data / "shakespeare_plays"
    meta = json.loads((d / "meta.json").read_text())
    starts = np.load(d / "train_docs.npy")
    assert len(starts) == 9 and len(np.load(d / "val_docs.npy")) == 9
    data = np.memmap(d / "train.bin", dtype=meta["dtype"], mode="r")
    text = lambda a, n: "".join(meta["chars"][i] for i in data[a:a + n])
    assert text(starts[1], 28) == "GLOUCESTER:\nNow is the winte"  # Richard III starts at its first speech
    assert text(starts[8], 18) == "Master:\nBoatswain!"


@pytest.mark.needs_data("wikitext2")
def test_wikitext_articles_are_documents(tmp_path, shared_data):
    from prepare import prepare
    meta = prepare("wikitext2_docs", input=str(shared_data / "wikitext2"), out_dir=str(tmp_path))
    starts = np.load(tmp_path / "val_docs.npy")
    assert len(np.load(tmp_path / "train_docs.npy")) == 110 and len(starts) == 12
    data = np.memmap(tmp_path / "val.bin", dtype=meta["dtype"], mode="r")
    for a in starts:  # every document opens with its title line
        assert "".join(meta["chars"][i] for i in data[a:a + 2]) == "= " and meta["chars"][data[a + 2]] != "="


def test_docs_loader_without_boundaries_names_the_fix(short_docs, tmp_path):
    from prepare import DataError
    import shutil
    shutil.copytree(short_docs / "docs", tmp_path / "docs")
    (tmp_path / "docs" / "train_docs.npy").unlink()
    with pytest.raises(DataError, match="train_docs.npy is missing.*prepare.py"):
        train.main(mem_cfg(tmp_path, tmp_path / "out"))


def test_doc_stream_reads_each_rows_documents_in_order():
    data = np.arange(100) % 50
    starts = np.array([0, 30, 37, 80])  # documents of 30, 7, 43 and 20 tokens
    s = DocStream(data, starts, n_rows=3, block_size=8, seed=0, shuffle=False)
    got = {g: [] for g in range(3)}
    for it in range(12):
        x, y, last, _ = s.batch(it, range(3), "cpu")
        for g in range(3):
            got[g].append((x[g].tolist(), y[g].tolist(), bool(last[g])))
    # row 0 reads document 0 (tokens 0..29: 4 windows), then document 3 (80..99: 3 windows), then 0 again;
    # row 1 reads document 1 (30..37) in one padded window, again and again
    xs0 = [t for x, y, _ in got[0][:4] for t, u in zip(x, y) if u >= 0]
    assert xs0 == list(range(29)) and [l for *_, l in got[0][:4]] == [False, False, False, True]
    assert got[0][4][0][:8] == list(data[80:88])
    assert got[0][7][0] == list(data[0:8])
    assert got[1][0][0][:6] == list(data[30:36]) and got[1][0][1][6:] == [-1, -1] and got[1][0][2]
    assert got[1][1] == got[1][0] and got[2][0][0][:8] == list(data[37:45])
    with pytest.raises(train.DataError, match="4 documents for 5 batch rows"):
        DocStream(data, starts, n_rows=5, block_size=8, seed=0)


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory, play_text):
    """Documents of 150..1,400 characters (one file each), cut from the committed play text."""
    from prepare import prepare
    text = play_text.read_text()
    src = tmp_path_factory.mktemp("src")
    pos = 0
    for i, n in enumerate([400, 1400, 150, 900, 600, 1200]):
        (src / f"doc{i}.txt").write_text(text[pos:pos + n])
        pos += n
    data_dir = tmp_path_factory.mktemp("data")
    prepare("text", input=str(src), tokenizer="char", out_dir=str(data_dir / "docs"))
    return data_dir


def rows_windows(data, cfg, seen):
    """(iteration, what a row's memory held, the row's window in its document) for each row of each
    recorded training forward; cfg has 2 micro-steps of batch_size 2."""
    stream = DocStream(np.memmap(data / "docs" / "train.bin", dtype=np.uint16, mode="r"),
                             np.load(data / "docs" / "train_docs.npy"), 4, cfg.block_size, cfg.seed)
    for i, held in enumerate(seen):
        it, micro = divmod(i, 2)
        for b, h in enumerate(held):
            yield it, h, stream.locate(it, micro * 2 + b)[1]


def record_memory_fill(monkeypatch) -> list:
    """A list that receives, at every training forward of a Memorizing layer, how many entries each row's
    memory holds."""
    seen = []
    forward = MemorizingMemory.forward

    def spy(self, attn, q, k, v, attend):
        if self.training:
            seen.append(self.mem["written"][self.rows].tolist() if self.mem is not None else [0] * q.size(0))
        return forward(self, attn, q, k, v, attend)

    monkeypatch.setattr(MemorizingMemory, "forward", spy)
    return seen


def test_memory_holds_exactly_the_rows_earlier_windows(short_docs, tmp_path, monkeypatch):
    seen = record_memory_fill(monkeypatch)
    cfg = tiny_train_config(short_docs, tmp_path, dataset="docs", loader="docs", knn_layer=1,
                            knn_topk=4, knn_memory_size=48, max_iters=12, eval_interval=100, block_size=64,
                            batch_size=2, gradient_accumulation_steps=2)
    train.main(cfg)
    ends = 0
    for it, n, w in rows_windows(short_docs, cfg, seen):
        assert n == w * 64  # every earlier window of this document, and nothing of the previous one
        ends += w == 0 and it > 0
    assert ends > 0  # some row moved on to a new document, and found its memory empty


def mem_cfg(data, out, **kw):
    """Rows cross document ends within a few iterations (windows of 32, documents of 135..1,260)."""
    return tiny_train_config(data, out, **{**dict(dataset="docs", loader="docs", knn_layer=1, knn_topk=4,
                                                  knn_memory_size=64, block_size=32, batch_size=2, eval_iters=2), **kw})


@pytest.mark.parametrize("mix,learn_scale", [("gate", False), ("joint", False), ("joint", True)])
def test_resume_with_memory_equals_uninterrupted(short_docs, tmp_path, mix, learn_scale):
    common = dict(dropout=0.1, lr_decay_iters=24, eval_interval=12, knn_mix=mix, knn_learn_scale=learn_scale)
    full = train.main(mem_cfg(short_docs, tmp_path / "full", max_iters=24, **common))
    part = tmp_path / "part"
    train.main(mem_cfg(short_docs, part, max_iters=12, **common))
    assert load_checkpoint(str(part / "ckpt.pt"))["knn_memory"]["written"].tolist() != [0, 0]
    resumed = train.main(mem_cfg(short_docs, part, max_iters=24, init_from="resume", **common))
    for it in range(12, 24):
        assert resumed["losses"][it] == pytest.approx(full["losses"][it], rel=1e-6)
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)
    from configurator import ConfigError
    with pytest.raises(ConfigError, match="knn_memory_size 64 -> 96"):  # the saved rows hold 64 entries
        train.main(mem_cfg(short_docs, part, max_iters=30, init_from="resume", **{**common, "knn_memory_size": 96}))
    flipped = {**common, "knn_learn_scale": not learn_scale}  # a parameter more or less
    with pytest.raises(ConfigError, match=f"knn_learn_scale {learn_scale} -> {not learn_scale}"):
        train.main(mem_cfg(short_docs, part, max_iters=30, init_from="resume", **flipped))
    if learn_scale:  # the factors learn (from 0) and are saved
        scale = load_checkpoint(str(part / "ckpt.pt"))["model"]["transformer.h.1.attn.memory.score_scale"]
        assert scale.shape == (2,) and bool((scale != 0).all())


def test_resume_takes_the_runs_memory_choices(short_docs, tmp_path, capsys):
    """knn_mix, topk and grad_windows change no weight: a resumed run uses its own (e.g. a last stage with
    knn_mix='joint'), says so, and its checkpoint records them; the first resumed step differs from the
    uninterrupted run's only by them."""
    common = dict(lr_decay_iters=24, eval_interval=12, knn_gate_init=0.0)  # open gates
    full = train.main(mem_cfg(short_docs, tmp_path / "full", max_iters=13, **common))
    part = tmp_path / "part"
    train.main(mem_cfg(short_docs, part, max_iters=12, **common))
    joint = train.main(mem_cfg(short_docs, part, max_iters=13, init_from="resume", knn_mix="joint", knn_topk=8,
                               knn_grad_windows=1, **common))
    assert "knn_topk 4 -> 8, knn_grad_windows 0 -> 1, knn_mix gate -> joint" in capsys.readouterr().out
    # an unchanged resume matches to 1e-6 (the test above); the memory is a small share of a char model's loss
    assert abs(joint["losses"][12] - full["losses"][12]) > 1e-5
    saved = load_checkpoint(str(part / "ckpt.pt"))["memory_args"]
    assert (saved["knn_mix"], saved["knn_topk"], saved["knn_grad_windows"]) == ("joint", 8, 1)
    mem = memorizing_layer(model_from_checkpoint(load_checkpoint(str(part / "ckpt.pt"))))
    assert (mem.mix, mem.topk, mem.grad_windows) == ("joint", 8, 1)


def test_grad_windows_started_late_recompute_only_what_they_kept():
    """A memory filled without grad_windows (a resume that turns them on) has no kept inputs for its
    entries: they are read as stored, so the output equals the detached memory's, and so do later windows
    (recomputed with the same weights)."""
    x = torch.randint(0, 50, (2, 64))
    plain = tiny_gpt(knn_layer=1, knn_topk=8, knn_memory_size=64).train()
    grad = tiny_gpt(knn_layer=1, knn_topk=8, knn_memory_size=64, knn_grad_windows=1).train()
    T = 16
    with torch.no_grad():
        for i in range(0, 2 * T, T):
            plain(x[:, i:i + T], x[:, i:i + T])
    grad_mem = memorizing_layer(grad)
    grad_mem.set_state(memorizing_layer(plain).get_state())
    for i in range(2 * T, 4 * T, T):
        want, _ = plain(x[:, i:i + T], x[:, i:i + T])
        got, _ = grad(x[:, i:i + T], x[:, i:i + T])
        torch.testing.assert_close(got, want)
    assert grad_mem.mem["recent_start"].tolist() == [2 * T, 2 * T]
    grad_mem.clear_rows([0])
    assert grad_mem.mem["recent_start"].tolist() == [0, 2 * T]


def test_gradient_accumulation_keeps_a_memory_per_micro_step_row(short_docs, tmp_path):
    big = train.main(mem_cfg(short_docs, tmp_path / "a", max_iters=6, batch_size=4))
    acc = train.main(mem_cfg(short_docs, tmp_path / "b", max_iters=6, batch_size=2, gradient_accumulation_steps=2))
    for it in range(6):
        assert acc["losses"][it] == pytest.approx(big["losses"][it], rel=1e-5)
    a = load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))["knn_memory"]
    b = load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["knn_memory"]
    assert torch.equal(a["written"], b["written"]) and torch.allclose(a["values"], b["values"], atol=1e-5)


def test_memory_layer_needs_the_docs_loader(short_docs, tmp_path):
    from configurator import ConfigError
    with pytest.raises(ConfigError, match="loader='docs'"):
        train.main(tiny_train_config(short_docs, tmp_path, dataset="docs", knn_layer=1))


@pytest.mark.slow
def test_ddp_ranks_keep_separate_memories(short_docs, tmp_path):
    # both per-row memories at once: a memorizing layer and an MNM block
    common = dict(max_iters=6, gradient_accumulation_steps=2, eval_interval=6, mnm_layer=0, mnm_heads=2,
                  mnm_key_size=8, mnm_hidden=16)
    single = train.main(mem_cfg(short_docs, tmp_path / "one", **common))
    settings = dict(dataset="docs", data_dir=short_docs, out_dir=tmp_path / "two", device="cpu",
                    dtype="float32", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=2, eval_iters=2,
                    log_interval=1, learning_rate=3e-3, warmup_iters=5, min_lr=3e-4, seed=1234, loader="docs",
                    knn_layer=1, knn_topk=4, knn_memory_size=64, **common)
    torchrun_train(settings)
    lines = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]
    ddp_losses = {l["iter"]: l["loss"] for l in lines if "loss" in l}
    for it in range(6):  # rank 1's rows read rank 1's memories: a broadcast from rank 0 would change this
        assert ddp_losses[it] == pytest.approx(single["losses"][it], rel=1e-4)
    one, two = (load_checkpoint(str(tmp_path / run / "ckpt.pt")) for run in ("one", "two"))
    knn1, knn2 = one["knn_memory"], two["knn_memory"]
    assert torch.equal(knn1["written"], knn2["written"])
    assert torch.allclose(knn1["values"], knn2["values"], atol=1e-4)
    assert not torch.allclose(knn2["values"][:2], knn2["values"][2:])  # the two ranks' rows differ
    mnm1, mnm2 = one["mnm_memory"], two["mnm_memory"]
    assert torch.equal(mnm1["fresh"], mnm2["fresh"])
    for k in ("w1", "w2"):
        assert torch.allclose(mnm1[k], mnm2[k], atol=1e-4)
        assert not torch.allclose(mnm2[k][:2], mnm2[k][2:])


# -----------------------------------------------------------------------------
# kNN-LM

def datastore(model, backend="torch"):
    settings = KNNSettings(knn_backend=backend, knn_nlist=4, knn_nprobe=4)
    store = KNNLMDatastore.create(model, settings, {"tokenizer": "char"})
    store.add_tokens(model, torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(0)).tolist(),
                     source="random")
    return store


def test_knnlm_lambda_zero_is_the_plain_model_bit_for_bit():
    model = tiny_gpt()
    store = datastore(model)
    x = torch.randint(0, 50, (2, 16))
    h, logits = last_mlp_input(model, x)
    assert torch.equal(knnlm_log_probs(logits, h, store, 0.0, 8, 1.0), F.log_softmax(logits.float(), -1))
    mixed = knnlm_log_probs(logits, h, store, 0.25, 8, 1.0)
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(2, 16), atol=1e-5)  # still a distribution
    assert not torch.allclose(mixed, F.log_softmax(logits, -1))


def test_knnlm_datastore_keys_and_values():
    model = tiny_gpt()
    tokens = torch.randint(0, 50, (40,)).tolist()
    store = KNNLMDatastore.create(model, KNNSettings(), {"tokenizer": "char"})
    store.add_tokens(model, tokens)
    assert len(store) == 39 and store.next_tokens().tolist() == tokens[1:]
    # key of position 20 = the last block's ln_2 output in its window (the second, 16..31)
    h, _ = last_mlp_input(model, torch.tensor([tokens[16:32]]))
    assert torch.allclose(store.keys[2][0, 20], h[0, 4])
    # a query equal to a stored key, with a sharp temperature, puts p_kNN on that entry's next token
    lp = knnlm_log_probs(torch.zeros(1, 50), h[0, 4][None], store, 0.999, 4, 1e-4)
    assert lp.argmax().item() == tokens[21]


def test_knnlm_datastore_save_load_round_trip(tmp_path):
    model = tiny_gpt()
    store = datastore(model, backend="faiss-ivf")
    store.save(str(tmp_path / "ds"))
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["kind"] == "knn-lm-datastore"
    loaded = KNNLMDatastore.load(str(tmp_path / "ds"), model, store.settings)
    assert torch.equal(loaded.keys[2], store.keys[2]) and torch.equal(loaded.next_tokens(), store.next_tokens())
    x = torch.randint(0, 50, (1, 16))
    h, logits = last_mlp_input(model, x)
    assert torch.equal(knnlm_log_probs(logits, h, loaded, 0.5, 8, 1.0), knnlm_log_probs(logits, h, store, 0.5, 8, 1.0))
    with pytest.raises(KNNMemoryError, match="another model"):
        KNNLMDatastore.load(str(tmp_path / "ds"), tiny_gpt(seed=5), store.settings)
    # IVF probing every list finds the exact neighbours
    exact = datastore(model, backend="torch")
    assert torch.allclose(knnlm_log_probs(logits, h, exact, 0.5, 8, 1.0), knnlm_log_probs(logits, h, store, 0.5, 8, 1.0),
                          atol=1e-5)


def test_knnlm_sampling_hook_matches_the_evaluation():
    model = tiny_gpt()
    store = datastore(model)
    x = torch.randint(0, 50, (2, 10))
    h, logits = last_mlp_input(model, x)
    want = knnlm_log_probs(logits, h, store, 0.25, 8, 1.0)[:, -1]
    plain = model(x)[0]
    hook = KNNLM(store, 0.25, 8, 1.0)
    hook.attach(model)
    with torch.no_grad():
        got = model(x)[0][:, -1]
    hook.detach()
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(model(x)[0], plain)  # detached: the plain model again


def test_memorizing_bench_suite(tmp_path, capsys):
    import bench
    from configurator import load_config
    out = tmp_path / "bench.json"
    cfg = load_config(bench.BenchConfig, [], n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=64,
                      batch_size=2, device="cpu", dtype="float32", suite=["memorizing"], knn_layer=1,
                      knn_memory_size=256, knnlm_size=500, bench_iters=1, bench_json=str(out))
    bench.main(cfg)
    assert "memorizing layer 1, 256 entries" in capsys.readouterr().out
    res = json.loads(out.read_text())["memorizing"]
    assert res["train"]["slowdown"] > 0 and res["knnlm"]["knnlm_tok_s"] > 0


def test_ppl_eval_with_the_gate_shut_equals_the_layer_off(short_docs, tmp_path):
    import evaluate
    from configurator import load_config
    from common import atomic_save
    train.main(mem_cfg(short_docs, tmp_path, max_iters=4, eval_interval=4))
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    ckpt["model"]["transformer.h.1.attn.memory.gate_bias"].fill_(float("-inf"))
    atomic_save(ckpt, str(tmp_path / "ckpt.pt"))
    cfg = load_config(evaluate.EvalConfig, [], out_dir=str(tmp_path), device="cpu", eval="ppl", eval_dataset="docs",
                      data_dir=str(short_docs), eval_context=True, eval_memory_sizes=[16, 64], batch_size=4)
    rows = evaluate.main(cfg)["rows"]
    assert [r["memory"] for r in rows] == [0, 16, 64]
    assert rows[0]["tokens"] == sum(len(d) - 1 for d in split_documents(str(short_docs / "docs"), "val")) + 6
    assert rows[1]["nll"] == pytest.approx(rows[0]["nll"], rel=1e-6) == rows[2]["nll"]
    assert (tmp_path / "eval_ppl" / "ppl.png").exists()


# -----------------------------------------------------------------------------
# metalearned neural memory in a GPT (memory.MNMBlock, mnm_layer)

def mnm_cfg(data, out, **kw):
    return mem_cfg(data, out, **{**dict(knn_layer=-1, mnm_layer=1, mnm_heads=2, mnm_key_size=8, mnm_hidden=16), **kw})


def test_mnm_rows_go_back_to_the_initial_weights():
    from memory import MNMBlock
    model = tiny_gpt(mnm_layer=1, mnm_heads=2, mnm_key_size=8, mnm_hidden=8, mnm_write="titans")
    block = model.transformer.h[1]
    assert isinstance(block, MNMBlock) and model.attentions[1] is block.block.attn
    block.reset(4)
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        model(x)  # rows 0, 1 (no .rows: the first B)
        block.rows = slice(2, 4)
        model(x)
    block.clear_rows(torch.tensor([1, 2]))
    init = block.mnm.initial_state(4)
    for k, v in block.state.items():
        for r in range(4):  # (the titans momentum s1 is still zero after one write: w2 starts at zero)
            assert torch.equal(v[r], init[k][r].detach()) == (r in (1, 2) or k == "s1"), (k, r)
    assert block.fresh.tolist() == [False, True, True, False]


def test_mnm_gradient_split_between_task_and_write_loss():
    """The task loss of a window whose rows carry earlier windows' (detached) state reaches the read path
    only; the write path and the initial weights learn from the write loss (and, for w1, w2, from the
    task loss of windows that start a document); the pooling score column is unused in a GPT."""
    from memory import MNM
    model = tiny_gpt(mnm_layer=1, mnm_heads=2, mnm_key_size=8, mnm_hidden=8).train()
    block, mnm = model.transformer.h[1], model.transformer.h[1].mnm
    H, dk, dv = mnm.H, mnm.dk, mnm.dv
    with torch.no_grad():  # as after some training: initial reads of zero would give the read keys no gradient
        mnm.w2.normal_()
    x = torch.randint(0, 50, (2, 32))
    block.reset()
    _, loss = model(x[:, :16], x[:, :16])  # fresh rows: every parameter gets a gradient
    (loss + MNM.write_loss_weight * block.write_loss).backward()
    unused = torch.zeros(H, 2 * dk + dv + 2, dtype=torch.bool)
    unused[:, -1] = True  # the pooling score: GPT windows write every token, nothing is pooled
    for name, p in model.named_parameters():
        g = p.grad
        if name.endswith("mnm.c_mem.weight") or name.endswith("mnm.c_mem.bias"):
            g = g.view(H, 2 * dk + dv + 2, -1)
            assert g[unused].abs().sum() == 0 and g[~unused].abs().sum(-1).min() > 0, name
        else:
            assert g is not None and g.abs().sum() > 0, name
    model.zero_grad()
    _, loss = model(x[:, 16:], x[:, 16:])  # a later window: reads the detached state; task loss only
    loss.backward()
    g = mnm.c_mem.weight.grad.view(H, 2 * dk + dv + 2, -1)
    assert g[:, dk:2 * dk].abs().sum() > 0 and mnm.c_proj.weight.grad.abs().sum() > 0  # read keys, output
    assert g[:, :dk].abs().sum() == 0 and g[:, 2 * dk:].abs().sum() == 0  # write keys, values, strengths
    for p in (mnm.w1, mnm.w2, mnm.target):
        assert p.grad is None or p.grad.abs().sum() == 0


def test_mnm_token_strengths_sum_to_at_most_one_step():
    """Per-token writes: a segment whose strengths sum past 1 is scaled to sum to 1, so one strong token
    among weak ones gets nearly the whole step (a pass key among filler), and a weak segment is not
    scaled up (dividing by S would have given each token at most 1/S)."""
    from memory import MNM
    torch.manual_seed(0)
    H, dk, dv, S = 2, 8, 8, 6
    mnm = MNM(n_embd=16, heads=H, key_size=dk, hidden=8)
    h = torch.eye(S, 16)[None]  # (1, S, 16): token t is the unit vector e_t
    mask = torch.ones(1, S, dtype=torch.bool)
    seen = {}

    def spy(state, k, v, beta, h, mask):
        seen["beta"] = beta.detach()
        return MNM.write(mnm, state, k, v, beta, h, mask)

    mnm.write = spy
    rows = [hd * (2 * dk + dv + 2) + 2 * dk + dv for hd in range(H)]  # each head's strength logit
    for logits in ([9.0] + [-9.0] * (S - 1), [4.0] * S, [-4.0] * S):
        with torch.no_grad():
            mnm.c_mem.weight.zero_()
            mnm.c_mem.bias.zero_()
            mnm.c_mem.weight[rows, :S] = torch.tensor(logits)
        mnm(h, mask, mnm.initial_state(1), read_first=True)
        raw = torch.sigmoid(torch.tensor(logits))
        torch.testing.assert_close(seen["beta"][0, :, :, 0], (raw / raw.sum().clamp(min=1)).expand(H, S))
    assert seen["beta"].sum() == pytest.approx(H * S * torch.sigmoid(torch.tensor(-4.0)).item())  # not scaled up


@pytest.mark.parametrize("shift", [False, True])
def test_mnm_write_penalty_is_the_strength_spent(shift):
    """mnm_write_penalty p adds p x (per row and head, the sum of the live tokens' strengths before the
    sum-to-1 scaling, averaged) to the write loss, and its gradient to the strengths' logits."""
    from memory import MNM
    h = torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    losses, grads = [], []
    for p in (0.0, 0.5):
        torch.manual_seed(0)
        mnm = MNM(n_embd=16, heads=2, key_size=8, hidden=8, shift=shift, write_penalty=p)
        _, _, loss = mnm(h, mask, mnm.initial_state(2), read_first=True)
        loss.backward()
        losses.append(loss.item())
        grads.append(mnm.c_mem.bias.grad.view(2, -1)[:, 2 * 8 + 8].clone())  # each head's strength logit
    b = mnm.c_mem(h).view(2, 6, 2, -1)[..., 2 * 8 + 8].detach()  # (B, S, H)
    live = mask[:, :, None].float()
    if shift:  # token t's key with token t + 1's strength
        b, live = b[:, 1:], (mask[:, :-1] & mask[:, 1:])[:, :, None].float()
    spent = (torch.sigmoid(b) * live).sum(1).mean()  # over rows and heads
    assert losses[1] - losses[0] == pytest.approx(0.5 * spent.item(), rel=1e-5)
    sig = torch.sigmoid(b)
    push = (sig * (1 - sig) * live).sum((0, 1)) / (2 * 2)  # d spent / d (each head's strength bias)
    torch.testing.assert_close(grads[1] - grads[0], 0.5 * push)  # > 0: every strength is pushed down
    with pytest.raises(ValueError, match="mnm_write_penalty=-1"):
        MNM(n_embd=16, heads=2, key_size=8, hidden=8, write_penalty=-1)


@pytest.mark.parametrize("budget", [1.0, 3.0])
def test_mnm_write_budget_caps_the_strength_a_window_spends(budget):
    """Per head, a window's strengths are scaled to sum to at most write_budget: left alone below it (each
    token then writes its own full-strength pair), scaled to sum exactly to it above. The write equals the
    rule applied with those strengths."""
    from memory import MNM
    torch.manual_seed(0)
    mnm = MNM(n_embd=16, heads=2, key_size=8, hidden=8, write_budget=budget)
    with torch.no_grad():
        mnm.c_mem.bias.view(2, -1)[:, 2 * 8 + 8] = torch.tensor([-4.0, 3.0])  # head 0 writes ~0.1, head 1 ~6 steps
    h, mask = torch.randn(1, 6, 16), torch.ones(1, 6, dtype=torch.bool)
    seen = []
    mnm.probe = lambda beta, kw, *_: seen.append(beta)
    _, new, _ = mnm(h, mask, mnm.initial_state(1), read_first=True)
    raw = torch.sigmoid(mnm.c_mem(h).view(1, 6, 2, -1)[..., 2 * 8 + 8]).transpose(1, 2)  # (B, H, S)
    beta = seen[0][..., 0]
    assert raw[0, 0].sum() < 1 and raw[0, 1].sum() > budget
    torch.testing.assert_close(beta[0, 0], raw[0, 0].detach())  # under the budget: as they are
    torch.testing.assert_close(beta[0, 1], raw[0, 1].detach() * budget / raw[0, 1].sum().detach())
    p = mnm.c_mem(h).view(1, 6, 2, -1).transpose(1, 2)
    k, _, v, _, _ = p.split([8, 8, 8, 1, 1], dim=-1)
    want = mnm.write(mnm.initial_state(1), F.normalize(k, dim=-1), v, seen[0], h, mask)
    torch.testing.assert_close(new["w2"], want["w2"])
    with pytest.raises(ValueError, match="mnm_write_budget=0"):
        MNM(n_embd=16, heads=2, key_size=8, hidden=8, write_budget=0)


@pytest.mark.parametrize("setting, attr, value", [("mnm_write_budget", "write_budget", 4.0),
                                                  ("mnm_key_spread", "key_spread", 1.0)])
def test_resume_may_change_the_mnm_write_settings(short_docs, tmp_path, capsys, setting, attr, value):
    """The write budget and the key spread change no weight: a resume takes the run's, says so, records it,
    and the first resumed step differs from the uninterrupted run's."""
    common = dict(lr_decay_iters=24, eval_interval=12, mnm_shift=True, mnm_grad_windows=1)
    full = train.main(mnm_cfg(short_docs, tmp_path / "full", max_iters=13, **common))
    part = tmp_path / "part"
    train.main(mnm_cfg(short_docs, part, max_iters=12, **common))
    before = getattr(mnm_block(model_from_checkpoint(load_checkpoint(str(part / "ckpt.pt")))).mnm, attr)
    more = train.main(mnm_cfg(short_docs, part, max_iters=13, init_from="resume", **{setting: value}, **common))
    assert f"{setting} {before} -> {value}" in capsys.readouterr().out
    assert abs(more["losses"][12] - full["losses"][12]) > 1e-6
    ckpt = load_checkpoint(str(part / "ckpt.pt"))
    assert ckpt["memory_args"][setting] == value
    assert getattr(mnm_block(model_from_checkpoint(ckpt)).mnm, attr) == value


@pytest.mark.parametrize("shift", [False, True])
def test_mnm_key_spread_is_the_strength_weighted_key_overlap(shift):
    """mnm_key_spread c adds c x the mean squared cosine between a window's distinct write keys, each pair
    weighted by both strengths (as the write uses them), to the write loss; the strengths get no gradient
    from it. Keys that are all one vector overlap 1."""
    from memory import MNM
    h = torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    losses, strength_grads = [], []
    for c in (0.0, 0.5):
        torch.manual_seed(0)
        mnm = MNM(n_embd=16, heads=2, key_size=8, hidden=8, shift=shift, write_budget=2.0, key_spread=c)
        seen = []
        mnm.probe = lambda beta, kw, *_: seen.append((beta, kw))
        _, _, loss = mnm(h, mask, mnm.initial_state(2), read_first=True)
        loss.backward()
        losses.append(loss.item())
        strength_grads.append(mnm.c_mem.bias.grad.view(2, -1)[:, 2 * 8 + 8].clone())
    beta, kw = seen[0][0][..., 0], seen[0][1]  # (B, H, S'), (B, H, S', dk)
    num = den = 0.0
    for b in range(2):
        for hd in range(2):
            for i in range(kw.size(2)):
                for j in range(kw.size(2)):
                    if i != j:
                        w = (beta[b, hd, i] * beta[b, hd, j]).item()
                        num += w * (kw[b, hd, i] @ kw[b, hd, j]).item() ** 2
                        den += w
    assert losses[1] - losses[0] == pytest.approx(0.5 * num / den, rel=1e-4)
    torch.testing.assert_close(strength_grads[1], strength_grads[0])
    same = F.normalize(torch.ones(2, 2, 5, 8), dim=-1)
    assert MNM.key_overlap(same, torch.rand(2, 2, 5)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mnm_key_spread=-1"):
        MNM(n_embd=16, heads=2, key_size=8, hidden=8, key_spread=-1)
    with pytest.raises(ValueError, match="use one of the two"):
        MNM(n_embd=16, heads=2, key_size=8, hidden=8, pool=True, key_spread=1.0)


def test_mnm_write_penalty_trains_strengths_down(short_docs, tmp_path):
    """Trained with a write penalty, the MNM block spends less strength per window of the data than without."""
    x = torch.from_numpy(np.fromfile(short_docs / "docs" / "val.bin", dtype=np.uint16)[:4 * 32].astype(np.int64))
    spent = {}
    for p in (0.0, 5.0):
        train.main(mnm_cfg(short_docs, tmp_path / str(p), max_iters=30, learning_rate=1e-2, mnm_write_penalty=p))
        ckpt = load_checkpoint(str(tmp_path / str(p) / "ckpt.pt"))
        assert ckpt["memory_args"]["mnm_write_penalty"] == p
        model = model_from_checkpoint(ckpt).train()
        block = mnm_block(model)
        losses = []
        for pen in (0.0, 1.0):  # the difference of the write losses is the strength spent
            block.mnm.write_penalty = pen
            block.reset()
            with torch.no_grad():
                model(x.view(4, 32))
            losses.append(block.write_loss.item())
        spent[p] = losses[1] - losses[0]
    assert spent[5.0] < 0.5 * spent[0.0]


def test_mnm_shift_writes_each_key_with_the_next_tokens_value():
    """mnm_shift: the write pairs token t's key with token t + 1's value and strength (S - 1 pairs); the reads
    are unchanged. Refused with pooled writes."""
    from memory import MNM
    torch.manual_seed(0)
    plain = MNM(n_embd=16, heads=2, key_size=8, hidden=8)
    shifted = MNM(n_embd=16, heads=2, key_size=8, hidden=8, shift=True)
    shifted.load_state_dict(plain.state_dict())
    h, mask = torch.randn(2, 7, 16), torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False  # row 1 has 5 tokens: 4 pairs
    seen = {}

    def spy(mnm):
        def write(state, k, v, beta, h, mask):
            seen[mnm.shift] = (k.detach(), v.detach(), beta.detach())
            return MNM.write(mnm, state, k, v, beta, h, mask)
        return write

    plain.write, shifted.write = spy(plain), spy(shifted)
    state = plain.initial_state(2)
    r0, _, _ = plain(h, mask, state, read_first=True)
    r1, _, _ = shifted(h, mask, state, read_first=True)
    torch.testing.assert_close(r0, r1)  # read before writing: the same reads
    (k0, v0, b0), (k1, v1, b1) = seen[False], seen[True]
    torch.testing.assert_close(k1, k0[:, :, :-1])
    torch.testing.assert_close(v1, v0[:, :, 1:])
    assert b1.shape[2] == 6 and torch.all(b1[1, :, 4:] == 0) and torch.all(b1[1, :, :4] > 0)  # padding writes nothing
    with pytest.raises(ValueError, match="mnm_shift"):
        MNM(n_embd=16, heads=2, key_size=8, hidden=8, pool=True, shift=True)


def test_mnm_shift_writes_the_pair_across_the_window_boundary():
    """A shifted block carries each row's last key into its next window, which then writes S pairs: the last,
    the previous window's last key (from the block's output there) with this window's first value. Nothing
    is carried into a document's first window, after clear_rows, or from a state that did not keep it."""
    torch.manual_seed(0)
    model = tiny_gpt(mnm_layer=1, mnm_heads=2, mnm_key_size=8, mnm_hidden=8, mnm_shift=True, mnm_value="token")
    block = mnm_block(model)
    outs, seen = [], []
    block.block.register_forward_hook(lambda module, args, out: outs.append(out))
    block.mnm.probe = lambda beta, kw, kr, v, state: seen.append((beta[..., 0], kw, v))
    x = torch.randint(0, model.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(1))
    for w in range(3):
        model(x[:, 16 * w:16 * (w + 1)])
    assert seen[0][0].shape[-1] == 16 and torch.all(seen[0][0][..., -1] == 0)  # a document's start carries nothing
    for w in (1, 2):
        beta, kw, v = seen[w]
        key = F.normalize(block.mnm.c_mem(outs[w - 1][:, -1]).view(2, 2, -1)[..., :8], dim=-1)  # (B, H, dk)
        value = F.normalize(model.transformer.wte(x[:, 16 * w]).view(2, 2, 8), dim=-1) * 8 ** 0.5
        torch.testing.assert_close(kw[:, :, -1], key)
        torch.testing.assert_close(v[:, :, -1], value)
        assert torch.all(beta[..., -1] > 0)
    block.clear_rows([0])  # row 0's document ended
    model(x[:, 48:64])
    assert torch.all(seen[-1][0][0, :, -1] == 0) and torch.all(seen[-1][0][1, :, -1] > 0)
    state = block.get_state()
    del state["last"]  # a checkpoint from before the carry
    block.set_state(state)
    model(x[:, 64:])
    assert torch.all(seen[-1][0][..., -1] == 0)


def test_mnm_token_values_are_the_next_tokens_embeddings():
    """mnm_value='token': pair t writes token t + 1's embedding (from the model's wte, unit RMS per head,
    detached), and c_mem has no value rows. Refused without
    mnm_shift, and without embeddings of the segment's shape."""
    from memory import MNM
    torch.manual_seed(0)
    model = tiny_gpt(mnm_layer=1, mnm_heads=2, mnm_key_size=8, mnm_hidden=8, mnm_shift=True, mnm_value="token")
    block = mnm_block(model)
    H, dv, dk = 2, model.config.n_embd // 2, 8
    assert block.mnm.c_mem.out_features == H * (2 * dk + 2)
    seen = []

    def write(state, k, v, beta, h, mask):
        seen.append(v)
        return MNM.write(block.mnm, state, k, v, beta, h, mask)

    block.mnm.write = write
    x = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model(x, x)
    e = model.transformer.wte(x).roll(-1, 1)  # (B, S, n_embd): the token after each key's; last, the first
    # token's, which the pair across the boundary writes under the previous window's last key
    want = F.normalize(e.view(2, 16, H, dv).transpose(1, 2), dim=-1) * dv ** 0.5  # (B, H, S, dv), unit RMS
    torch.testing.assert_close(seen[0], want)
    assert not seen[0].requires_grad  # the write loss cannot shrink the embeddings to make them easy to store
    with pytest.raises(ValueError, match="mnm_shift=True"):
        MNM(n_embd=16, heads=2, key_size=8, hidden=8, value="token")
    with pytest.raises(ValueError, match="mnm_value must be one of"):
        MNM(n_embd=16, heads=2, key_size=8, hidden=8, shift=True, value="tokens")
    from configurator import ConfigError, load_config
    with pytest.raises(ConfigError, match="set mnm_shift=True"):  # refused when the settings are read, before any work
        load_config(train.TrainConfig, [], mnm_layer=1, mnm_value="token", loader="docs")
    mnm = MNM(n_embd=16, heads=2, key_size=8, hidden=8, shift=True, value="token")
    with pytest.raises(ValueError, match=r"pass embeddings of shape \(1, 4, 16\)"):
        mnm(torch.randn(1, 4, 16), torch.ones(1, 4, dtype=torch.bool), mnm.initial_state(1))


@pytest.mark.parametrize("value", ["hidden", "token"])
def test_mnm_tied_keys_read_under_the_write_key(value):
    """mnm_tie_keys: one projection for read and write keys, so the MNM computes what an untied one does
    whose read-key rows equal its write-key rows (match_read_keys); and the task loss alone trains the write
    keys (untied, only the write loss or mnm_grad_windows reach them)."""
    from memory import MNM
    torch.manual_seed(0)
    kw = dict(n_embd=16, heads=2, key_size=8, hidden=8, shift=True, value=value)
    untied, tied = MNM(**kw), MNM(**kw, tie_keys=True)
    width = sum(untied.parts.values())
    keep = torch.cat([torch.arange(h * width, (h + 1) * width) for h in range(2)]).view(2, width)
    keep = torch.cat([keep[:, :8], keep[:, 16:]], 1).reshape(-1)  # each head's rows without its read key's
    assert tied.c_mem.out_features == keep.numel() == 2 * (8 + (8 if value == "hidden" else 0) + 2)
    with torch.no_grad():
        tied.c_mem.weight.copy_(untied.c_mem.weight[keep])
        tied.c_mem.bias.copy_(untied.c_mem.bias[keep])
        for name in ("w1", "w2", "target"):
            getattr(tied, name).copy_(getattr(untied, name))
        tied.c_proj.load_state_dict(untied.c_proj.state_dict())
    h, mask = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    e = torch.randn(2, 6, 16) if value == "token" else None
    state = untied.initial_state(2)
    _, state, _ = untied(h, mask, state, embeddings=e)  # something written, so reads differ from zero
    state = {k: v.detach() for k, v in state.items()}
    h2 = torch.randn(2, 6, 16, requires_grad=True)
    outs = [m(h2, mask, state, read_first=True, embeddings=e) for m in (untied, tied)]
    torch.testing.assert_close(outs[1][0], outs[0][0])
    for k in state:
        torch.testing.assert_close(outs[1][1][k], outs[0][1][k])
    for m, (reads, _, _) in zip((untied, tied), outs):
        m.zero_grad()
        reads.pow(2).sum().backward()  # a task loss on the reads alone
    write_key_rows = lambda m: m.c_mem.weight.grad.view(2, -1, 16)[:, :8]
    assert torch.all(write_key_rows(untied) == 0) and write_key_rows(tied).abs().sum() > 0


def test_mnm_token_values_saved_and_reloaded_give_identical_outputs(tmp_path):
    """A model with token values rebuilt from its checkpoint (model_from_checkpoint re-installs the embedding
    hook) reads and writes exactly as the original, window after window."""
    torch.manual_seed(0)
    model = tiny_gpt(mnm_layer=1, mnm_heads=2, mnm_key_size=8, mnm_hidden=8, mnm_shift=True, mnm_value="token").eval()
    x = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    ckpt = {"model": model.state_dict(), "model_args": model_args(model), "memory_args": memory_args(model)}
    again = model_from_checkpoint(ckpt).eval()
    assert again.memory_args["mnm_value"] == "token"
    torch.testing.assert_close(windows(again, x), windows(model, x), rtol=0, atol=0)


def test_mnm_fingerprint_unchanged_without_the_block():
    from knn import model_fingerprint
    a, b = tiny_gpt(), tiny_gpt(mnm_heads=8, mnm_write="grad")  # off: the mnm_* settings change nothing
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(tiny_gpt(mnm_layer=1, mnm_heads=2, mnm_key_size=8)) != model_fingerprint(a)


def test_mnm_memory_starts_fresh_exactly_at_each_document(short_docs, tmp_path, monkeypatch):
    from memory import MNMBlock
    seen = []
    forward = MNMBlock.forward

    def spy(self, x, cache=None, mask=None):
        if self.training:
            seen.append(self.fresh[self.rows].tolist() if self.fresh is not None else [True] * x.size(0))
        return forward(self, x, cache, mask)

    monkeypatch.setattr(MNMBlock, "forward", spy)
    cfg = mnm_cfg(short_docs, tmp_path, max_iters=20, eval_interval=8, gradient_accumulation_steps=2)
    out = train.main(cfg)
    assert out["losses"][19] < out["losses"][0] - 0.3  # it trains
    ends = 0
    for it, f, w in rows_windows(short_docs, cfg, seen):
        assert f == (w == 0)  # at the initial weights exactly when the row starts a document
        ends += f and it > 0
    assert ends > 0


def test_resume_with_mnm_equals_uninterrupted(short_docs, tmp_path):
    common = dict(dropout=0.1, lr_decay_iters=24, eval_interval=12, mnm_write="titans")
    full = train.main(mnm_cfg(short_docs, tmp_path / "full", max_iters=24, **common))
    part = tmp_path / "part"
    train.main(mnm_cfg(short_docs, part, max_iters=12, **common))
    state = load_checkpoint(str(part / "ckpt.pt"))["mnm_memory"]
    assert set(state) == {"w1", "w2", "s1", "s2", "fresh"} and state["fresh"].tolist() == [False, False]
    resumed = train.main(mnm_cfg(short_docs, part, max_iters=24, init_from="resume", **common))
    for it in range(12, 24):
        assert resumed["losses"][it] == pytest.approx(full["losses"][it], rel=1e-6)
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)
    from configurator import ConfigError
    with pytest.raises(ConfigError, match="mnm_shift False -> True"):  # the write pairs are part of the model
        train.main(mnm_cfg(short_docs, part, max_iters=30, init_from="resume", mnm_shift=True, **common))


def test_mnm_layer_needs_the_docs_loader(short_docs, tmp_path):
    from configurator import ConfigError
    with pytest.raises(ConfigError, match="MNM block .*loader='docs'"):
        train.main(tiny_train_config(short_docs, tmp_path, dataset="docs", mnm_layer=1))
