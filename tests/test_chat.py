"""The seq2seq chatbot: elastic vocabulary, metalearned memory, dialogue data, training, chat and eval."""
import json

import pytest
import torch

import evaluate
import sample
import train
from configurator import load_config
from conftest import tiny_dialog_config, tiny_dialog_settings, tiny_train_config, torchrun_train
from memory import MNM, MNMBlock
from chat import (Conversation, DialogBatches, Seq2Seq, Seq2SeqConfig, grow_vocab, prune_vocab, remap_vocab)
from checkpoint import load_checkpoint, model_from_checkpoint
from common import seeded_generator
from model import GPT, GPTConfig
from prepare import DIALOG_HELDOUT_NAMES, SPECIALS, DataError, WordVocab, hf_dialogs, prepare
from sample import SampleConfig


def tiny_seq2seq(memory="mnm", write="local", vocab_size=40, **kw):
    torch.manual_seed(0)
    return Seq2Seq(Seq2SeqConfig(vocab_size=vocab_size, block_size=12, n_layer=2, n_enc_layer=2, n_head=2,
                                 n_embd=32, memory=memory, mnm_write=write, mnm_heads=2, mnm_key_size=8,
                                 mnm_hidden=16, **kw))


def dialog_batch(B=3, N=4, S=6, T=5, V=40, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(len(SPECIALS), V + K, (B, N, S), generator=g)
    src[:, :, S - 2:] = 0  # padding at the end of every utterance
    src[0, N - 1] = 0  # row 0 has one turn fewer
    tgt = torch.randint(len(SPECIALS), V + K, (B, N, T), generator=g)
    tgt[..., 0] = 1
    targets = torch.randint(len(SPECIALS), V + K, (B, N, T), generator=g)
    targets[0, N - 1] = -1
    slots = torch.randn(B, K, 32, generator=g) * 0.02
    return src, tgt, targets, slots


def adam_step(model, batch):
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    _, loss = model(*batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


# ---- vocabulary ----

def test_word_tokenizer_rules():
    v = WordVocab()
    assert v.tokenize("Hi, I'm Bob!  My cat's 3.") == ["hi", ",", "i'm", "bob", "!", "my", "cat's", "3", "."]
    assert v.tokenize("<user> hello <bot>") == ["<user>", "hello", "<bot>"]
    v.add(v.tokenize("hi , i'm bob !"))
    assert v.decode(v.encode("Hi, I'm Bob!")) == "hi, i'm bob!"
    assert v.encode("hi zork") == [v.stoi["hi"], v.unk]
    assert v.words[:len(SPECIALS)] == list(SPECIALS)


@pytest.mark.parametrize("kind", ["gpt", "seq2seq"])
def test_growth_keeps_every_row_and_logit_and_the_optimizer_in_step(kind):
    if kind == "gpt":
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=32))
        batch = (torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8)))
        logits_of = lambda m: m(batch[0], batch[1])[0]
    else:
        model = tiny_seq2seq()
        batch = dialog_batch()
        V = lambda m: m.config.vocab_size  # slot ids follow the vocabulary: shift them as it grows
        shift = lambda t, m: torch.where(t >= 40, t + V(m) - 40, t)
        logits_of = lambda m: m(shift(batch[0], m), shift(batch[1], m), None, batch[3])[0]
    opt = adam_step(model, batch)
    old = model.transformer.wte.weight
    old_rows, old_state = old.detach().clone(), {k: v.clone() for k, v in opt.state[old].items()}
    with torch.no_grad():
        before = logits_of(model)
    new = remap_vocab(model, range(40), 5, opt, torch.Generator().manual_seed(1))
    assert new.shape == (45, 32) and model.lm_head.weight is new and model.config.vocab_size == 45
    assert torch.equal(new[:40], old_rows)
    with torch.no_grad():
        after = logits_of(model)
    if kind == "gpt":
        assert torch.equal(after[..., :40], before)
    else:  # the vocabulary's logits, then the slots'
        assert torch.equal(after[..., :40], before[..., :40]) and torch.equal(after[..., 45:], before[..., 40:])
    # the new Parameter replaced the old one everywhere in the optimizer; no stale one left behind
    params = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is new for p in params) and not any(p is old for p in params) and old not in opt.state
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[new][k][:40], old_state[k]) and not opt.state[new][k][40:].any()
    # and it trains: a loss on a new token moves its row
    ids = torch.full((2, 8), 42) if kind == "gpt" else None
    if kind == "gpt":
        _, loss = model(ids, ids)
    else:
        src, tgt, targets, slots = batch
        _, loss = model(src, tgt, torch.where(targets >= 0, 42, -1), slots)
    loss.backward()
    row = new[42].detach().clone()
    opt.step()
    assert not torch.equal(new[42], row)


def test_new_rows_follow_the_documented_rule():
    model = tiny_seq2seq()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(3.0)
    rms = model.transformer.wte.weight.pow(2).mean().sqrt()
    new = remap_vocab(model, range(40), 4000, None, torch.Generator().manual_seed(0))
    assert new[40:].pow(2).mean().sqrt().item() == pytest.approx(rms.item(), rel=0.03)
    assert new[40:].mean().abs() < 0.01 * rms


def test_prune_remaps_vocab_embedding_optimizer_and_counts():
    model = tiny_seq2seq(vocab_size=len(SPECIALS))
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    vocab = WordVocab()
    words = [f"w{i}" for i in range(30)]
    grow_vocab(vocab, model, words, step=0, optimizer=opt, generator=torch.Generator().manual_seed(0))
    for i, w in enumerate(words):  # w_i seen i more times, last at step i
        vocab.observe([vocab.stoi[w]] * i, step=i)
    src, tgt, targets, slots = dialog_batch(V=len(vocab))
    _, loss = model(src, tgt, targets, slots)
    loss.backward()
    opt.step()
    emb = model.transformer.wte.weight
    row_of = {w: emb[vocab.stoi[w]].detach().clone() for w in vocab.words}
    avg_of = {w: opt.state[emb]["exp_avg"][vocab.stoi[w]].clone() for w in vocab.words}
    count_of = {w: vocab.counts[vocab.stoi[w]] for w in vocab.words}
    dropped = prune_vocab(vocab, model, min_count=5, capacity=len(SPECIALS) + 10, optimizer=opt, keep=["w7"])
    # below min_count: w0..w4 (w0 also counts once, when grown); over capacity: the least recently seen go
    assert vocab.words[:len(SPECIALS)] == list(SPECIALS)
    assert vocab.words[len(SPECIALS):] == ["w7"] + [f"w{i}" for i in range(21, 30)]
    assert set(dropped) == set(words) - set(vocab.words)
    new = model.transformer.wte.weight
    assert new.shape[0] == len(vocab) == model.config.vocab_size and model.lm_head.weight is new
    assert any(p is new for g in opt.param_groups for p in g["params"]) and emb not in opt.state
    for w in vocab.words:
        i = vocab.stoi[w]
        assert torch.equal(new[i], row_of[w]) and torch.equal(opt.state[new]["exp_avg"][i], avg_of[w])
        assert vocab.counts[i] == count_of[w]
    with pytest.raises(DataError, match="capacity"):
        vocab.prune(capacity=3)


# ---- memory ----

@pytest.mark.parametrize("write", ["local", "grad", "titans"])
def test_gradient_reaches_every_parameter(write):
    model = tiny_seq2seq(write=write)
    _, loss = model(*dialog_batch())
    loss.backward()
    frozen = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not frozen, f"parameters without gradient: {frozen}"


@pytest.mark.parametrize("write,read", [("local", "before"), ("grad", "after"), ("titans", "before")])
def test_memory_rows_are_separate_conversations(write, read):
    model = tiny_seq2seq(write=write, mnm_read=read).eval()
    batch = dialog_batch()
    with torch.no_grad():
        together, _ = model(*batch)
        for b in range(3):
            alone, _ = model(*(t[b:b + 1] for t in batch))
            torch.testing.assert_close(alone[0], together[b], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("read", ["before", "after"])
def test_memory_carries_turns_and_off_is_a_baseline(read):
    model = tiny_seq2seq(mnm_read=read).eval()
    src, *_ = dialog_batch()
    with torch.no_grad():
        enc, mask = model.encode(src[:, 0])
        _, _, state, _ = model.remember(enc, mask, model.initial_state(3))
        enc2, mask2 = model.encode(src[:, 1])
        with_memory = model.remember(enc2, mask2, state)[0]
        fresh = model.remember(enc2, mask2, model.initial_state(3))[0]
        off = model.remember(enc2, mask2, state, persist=False)[0]
        # reading after the write, a turn's reads see its own write; before it, only the earlier turns
        first = read == "before"
        written = model.memory(enc2, mask2, state, torch.ones(3, dtype=torch.bool), read_first=first)[0]
        unwritten = model.memory(enc2, mask2, state, torch.zeros(3, dtype=torch.bool), read_first=first)[0]
    assert not torch.allclose(with_memory, fresh)  # the first turn reached the second through the memory
    assert torch.equal(off, fresh)  # memory off: nothing of the first turn is left
    assert torch.equal(written, unwritten) == first


def test_grad_write_is_the_gradient_of_the_write_loss():
    torch.manual_seed(0)
    mnm = MNM(32, 2, 8, 16, "grad")
    h, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    state = {k: v.detach().clone().requires_grad_(True) for k, v in mnm.initial_state(2).items()}
    p = mnm.c_mem(h).view(2, 5, 2, -1).transpose(1, 2)
    kw, _, v, b, _ = p.split([8, 8, 16, 1, 1], dim=-1)
    kw = torch.nn.functional.normalize(kw, dim=-1)
    beta = torch.sigmoid(b + mnm.beta_offset)
    new = mnm.write(state, kw, v, beta, h, mask)
    out, _ = mnm.recall(state, kw)
    loss = (beta * (out - v).pow(2)).sum() / 2
    g1, g2 = torch.autograd.grad(loss, [state["w1"], state["w2"]])
    lr = torch.nn.functional.softplus(mnm.lr)[None, :, None, None]
    torch.testing.assert_close(new["w1"], state["w1"] - lr * g1)
    torch.testing.assert_close(new["w2"], state["w2"] - lr * g2)


def test_mnm_block_writes_a_document_segment_by_segment():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=32))
    block = MNMBlock(model.transformer.h[1], MNM(32, 2, 8, 16, "titans"))
    model.transformer.h[1] = block
    doc = torch.randint(0, 50, (3, 24))
    loss = 0
    for seg in doc.split(8, dim=1):  # the memory carries what earlier segments said
        _, l = model(seg, seg)
        loss = loss + l + block.write_loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.mnm.parameters())
    with torch.no_grad():
        block.reset()
        model(doc[:, :8])
        carried = model(doc[:, 8:16])[0]
        block.reset()
        fresh = model(doc[:, 8:16])[0]
        block.reset()
        alone = [model(doc[:1, :8]), model(doc[:1, 8:16])[0]][1]
    assert not torch.allclose(carried, fresh)
    torch.testing.assert_close(alone[0], carried[0], rtol=1e-5, atol=1e-5)


# ---- decoding ----

def test_cached_reply_equals_recomputed():
    model = tiny_seq2seq().eval()
    src, *_ = dialog_batch()
    with torch.no_grad():
        enc, mask = model.encode(src[:, 0])
        cross, cross_mask, _, _ = model.remember(enc, mask, model.initial_state(3))
        # sampling at a high temperature, so many different tokens come up before <eos>
        gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]
        cached = model.reply(cross, cross_mask, 12, temperature=2.0, generators=gens(), use_cache=True)
        recomputed = model.reply(cross, cross_mask, 12, temperature=2.0, generators=gens(), use_cache=False)
        assert torch.equal(cached, recomputed) and cached.size(1) > 3
        # and the cached logits are those of a full pass
        full = model.decode(torch.cat([torch.ones(3, 1, dtype=torch.long), cached[:, :-1]], 1), cross, cross_mask)
        from model import KVCache
        cache = KVCache(model.config, 3, "cpu", torch.float32)
        steps = [model.decode(tok[:, None], cross, cross_mask, cache=cache)
                 for tok in torch.cat([torch.ones(3, 1, dtype=torch.long), cached[:, :-1]], 1).T]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


# ---- data ----

def test_dialogs_generator(dialog_data):
    folder = dialog_data / "dialogs"
    splits = {s: [json.loads(l) for l in open(folder / f"dialogs_{s}.jsonl")] for s in ("train", "val", "test")}
    names = {s: {t["answer"] for d in ds for t in d["turns"] if t.get("attribute") in ("name", "friend")}
             for s, ds in splits.items()}
    assert names["train"] and not names["train"] & (names["val"] | names["test"])
    assert not names["val"] & names["test"] and names["test"] <= set(DIALOG_HELDOUT_NAMES)
    repeats = 0
    for d in splits["train"][:500]:
        stated = {}
        for n, t in enumerate(d["turns"]):
            if t["kind"] == "fact":
                stated[t["attribute"]] = (n, t["answer"])
                assert t["answer"] in WordVocab.tokenize(t["user"]) and t["answer"] in d["entities"]
            elif t["kind"] == "question":
                assert stated[t["attribute"]] == (t["fact_turn"], t["answer"])
                assert t["answer"] in WordVocab.tokenize(t["bot"])
                repeats += t["repeat"]
    assert repeats > 50
    meta = json.load(open(folder / "meta.json"))
    assert meta["tokenizer"] == "word" and meta["vocab"]["words"][:len(SPECIALS)] == list(SPECIALS)
    again = prepare("dialogs", out_dir=str(dialog_data / "again"))
    assert again["train_tokens"] == meta["train_tokens"]
    assert (dialog_data / "again" / "dialogs_test.jsonl").read_text() == (folder / "dialogs_test.jsonl").read_text()


def test_jsonl_turns_and_hugging_face_layout(tmp_path, monkeypatch):
    rows = [{"dialog": d, "user": f"hello number {d} .", "bot": f"hi {d} !"} for d in range(6) for _ in range(2)]
    path = tmp_path / "turns.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare("dialogs", input=str(path), out_dir=str(tmp_path / "out"), val_frac=0.2)
    test = [json.loads(l) for l in open(tmp_path / "out" / "dialogs_test.jsonl")]
    assert len(test) == 1 and test[0]["turns"][1] == {"user": "hello number 5 .", "bot": "hi 5 !", "kind": "chat"}
    path.write_text('{"dialog": 1, "user": "hi"}\n')
    with pytest.raises(DataError, match="line 1"):
        prepare("dialogs", input=str(path), out_dir=str(tmp_path / "bad"))
    # a local stand-in for a hub dataset with DailyDialog's layout
    import datasets
    ds = datasets.Dataset.from_dict({"dialog": [["Hi!", "Hello.", "How are you?", "Fine."], ["One"]]})
    assert hf_dialogs(ds) == [{"turns": [{"user": "Hi!", "bot": "Hello.", "kind": "chat"},
                                         {"user": "How are you?", "bot": "Fine.", "kind": "chat"}], "entities": []}]
    import prepare as prepare_module
    monkeypatch.setattr(prepare_module, "load_hf", lambda path, *a, **k: {"train": datasets.Dataset.from_dict(
        {"dialog": [[f"Hello {i}.", f"Hi {i}!"] for i in range(10)]})})
    meta = prepare("dialogs", input="hf:someone/dialogues", out_dir=str(tmp_path / "hf"))
    assert meta["source"] == "https://huggingface.co/datasets/someone/dialogues"
    assert json.loads(open(tmp_path / "hf" / "dialogs_test.jsonl").readline())["turns"][0]["user"] == "Hello 9."


def test_batches_swap_fact_words_for_slots(dialog_data):
    db = DialogBatches(str(dialog_data / "dialogs"), 1, 8, 16)
    dialogs = db.draw("train", 0, 0, 4)
    vocab = WordVocab()
    vocab.add(db.words(dialogs))
    assert not {e for d in dialogs for e in d["entities"]} & set(vocab.words)
    src, tgt, targets, slots = db.tensors(dialogs, vocab, torch.randn(len(vocab), 32), seeded_generator(0), "cpu")
    V = len(vocab)
    assert slots.shape == (4, 8, 32) and (src >= V).any() and (targets >= V).any()
    again = db.tensors(dialogs, vocab, torch.randn(len(vocab), 32), seeded_generator(0), "cpu")
    assert all(torch.equal(a, b) for a, b in zip((src, tgt, targets), again[:3]))
    # an answer is the slot its fact put in the user's turn
    d = dialogs[0]
    for n, t in enumerate(d["turns"]):
        if t["kind"] == "question":
            answer_ids = set(targets[0, n].tolist()) & set(range(V, V + 8))
            assert answer_ids and answer_ids <= set(src[0, t["fact_turn"]].tolist())


# ---- training, checkpoints, chat, eval ----

@pytest.fixture(scope="module")
def trained(dialog_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = train.main(tiny_dialog_config(dialog_data, out))
    return out, result


def test_training_checkpoint_holds_vocab_and_memory(trained):
    out, result = trained
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    vocab = WordVocab.from_dict(ckpt["vocab"])
    assert len(vocab) > 50 and ckpt["model_args"]["vocab_size"] == len(vocab)
    assert any(c > 0 for c in vocab.counts) and max(vocab.last_seen) == 5
    model = model_from_checkpoint(ckpt)
    assert isinstance(model, Seq2Seq) and model.memory is not None
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ckpt["model"].items()) and "memory.w1" in sd
    # the optimizer state covers the grown embedding
    emb_state = [s for s in ckpt["optimizer"]["state"].values() if s["exp_avg"].shape[0] == len(vocab)]
    assert emb_state


def test_resume_equals_uninterrupted_dialog_run(dialog_data, tmp_path):
    common = dict(dropout=0.1, eval_interval=3, vocab_prune_every=4, vocab_min_count=3)
    full = train.main(tiny_dialog_config(dialog_data, tmp_path / "full", **common))
    train.main(tiny_dialog_config(dialog_data, tmp_path / "part", max_iters=3, lr_decay_iters=6, **common))
    resumed = train.main(tiny_dialog_config(dialog_data, tmp_path / "part", init_from="resume", **common))
    for it in range(3, 6):
        assert resumed["losses"][it] == pytest.approx(full["losses"][it], rel=1e-6)
    a, b = load_checkpoint(str(tmp_path / "full" / "ckpt.pt")), load_checkpoint(str(tmp_path / "part" / "ckpt.pt"))
    assert a["vocab"] == b["vocab"]


def chat_config(out, **kw):
    return load_config(SampleConfig, [], out_dir=str(out), device="cpu", **kw)


def test_conversation_save_and_restore(trained, tmp_path):
    out, _ = trained
    model, vocab, _, _ = sample.load_model("resume", str(out), "cpu")
    conv = Conversation(model, vocab, seed=3)
    conv.turn(["my name is zebulon ."])
    conv.turn(["i live in oslo ."])
    conv.save(str(tmp_path / "conv"))
    later = [conv.turn(["what is my name ?"]), conv.turn(["where do i live ?"])]
    state, emb, words = {k: v.clone() for k, v in conv.state.items()}, model.transformer.wte.weight.clone(), conv.vocab.to_dict()
    model2, vocab2, _, _ = sample.load_model("resume", str(out), "cpu")
    conv2 = Conversation(model2, vocab2, seed=99)
    conv2.load(str(tmp_path / "conv"))
    assert "zebulon" in conv2.vocab
    assert [conv2.turn(["what is my name ?"]), conv2.turn(["where do i live ?"])] == later
    assert all(torch.equal(conv2.state[k], state[k]) for k in state)
    assert torch.equal(model2.transformer.wte.weight, emb) and conv2.vocab.to_dict() == words
    assert json.load(open(tmp_path / "conv.json"))["vocab"]["words"][-1] in conv2.vocab


def test_chat_replays_a_script_with_save_and_load(trained, tmp_path):
    out, _ = trained
    script = tmp_path / "script.txt"
    script.write_text(f"my name is quirinus .\n/save {tmp_path / 'c1'}\nwhat is my name ?\n/reset\n"
                      f"/load {tmp_path / 'c1'}\nwhat is my name ?\n")
    transcript = sample.main(chat_config(out, mode="chat", chat_script=str(script), chat_save=str(tmp_path / "end"),
                                         vocab_capacity=200, output_json=str(tmp_path / "t.json")))
    assert [t["user"] for t in transcript] == ["my name is quirinus .", "what is my name ?", "what is my name ?"]
    assert transcript[1]["bot"] == transcript[2]["bot"]  # reloaded: the same memory answers the same
    assert (tmp_path / "end.safetensors").exists() and json.load(open(tmp_path / "t.json"))["transcript"]


def test_eval_dialog_writes_json_and_png(trained, dialog_data, tmp_path):
    out, _ = trained
    cfg = load_config(evaluate.EvalConfig, [], out_dir=str(out), device="cpu", eval="dialog", eval_items=12,
                      batch_size=5, eval_file=str(dialog_data / "dialogs" / "dialogs_test.jsonl"),
                      eval_out=str(tmp_path / "ev"))
    result = evaluate.main(cfg)
    summary = result["summary"]
    assert set(summary["all"]) == {"memory", "no_memory"} and summary["all"]["memory"]["n"] > 12
    assert summary["new_word"]["True"]["memory"]["n"] > 0 and set(summary["repeat"]) <= {"True", "False"}
    assert json.load(open(tmp_path / "ev" / "dialog.json"))["questions"]
    assert (tmp_path / "ev" / "dialog.png").stat().st_size > 5000


def test_gpt_trains_and_samples_on_the_word_vocabulary(dialog_data, tmp_path):
    result = train.main(tiny_train_config(dialog_data, tmp_path, dataset="dialogs", max_iters=4, eval_interval=4))
    assert result["iter_num"] == 4
    samples = sample.main(chat_config(tmp_path, start="<user> my name is bob . <bot>", num_samples=1,
                                      max_new_tokens=5, temperature=0.0))
    assert len(WordVocab.tokenize(samples[0]["completion"])) >= 1
    with pytest.raises(Exception, match="seq2seq"):
        sample.main(chat_config(tmp_path, mode="chat"))


@pytest.mark.slow
def test_ddp_dialog_training_equals_one_process(dialog_data, tmp_path):
    common = dict(gradient_accumulation_steps=2, batch_size=2)
    single = train.main(tiny_dialog_config(dialog_data, tmp_path / "one", **common))
    torchrun_train({**tiny_dialog_settings(dialog_data, tmp_path / "two"), **common})
    lines = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]
    ddp_losses = {l["iter"]: l["loss"] for l in lines if "loss" in l}
    assert sorted(ddp_losses) == list(range(6))  # the vocabulary grew on both ranks alike
    for it in range(6):
        assert ddp_losses[it] == pytest.approx(single["losses"][it], rel=1e-4)


@pytest.mark.parametrize("tbptt", [0, 1])
def test_truncated_backpropagation_through_the_writes(tbptt):
    model = tiny_seq2seq(mnm_tbptt=tbptt)
    model.memory.write_loss_weight = 0.0  # only the reply loss, which reaches earlier turns through the memory
    src, tgt, targets, slots = dialog_batch()
    targets = torch.full_like(targets, -1)
    targets[:, 2] = 7  # a loss on the third turn's reply only
    inputs = {}

    def keep_input(module, args):
        args[0].retain_grad()
        inputs["x"] = args[0]

    model.transformer.enc[0].register_forward_pre_hook(keep_input)
    _, loss = model(src, tgt, targets, slots)
    loss.backward()
    first_turn = inputs["x"].grad.view(3, 4, 6, 32)[:, 0]
    # the first turn reaches the third only through the memory's writes, which tbptt=1 cuts
    assert (first_turn.abs().sum() > 0) == (tbptt == 0)


def test_chat_vocabulary_capacity_evicts_least_recent_new_words(trained):
    out, _ = trained
    model, vocab, _, _ = sample.load_model("resume", str(out), "cpu")
    conv = Conversation(model, vocab, capacity=len(vocab) + 2)
    for name in ("aaron", "berta", "cyril"):
        conv.turn([f"my name is {name} ."])
    assert "aaron" not in conv.vocab and "berta" in conv.vocab and "cyril" in conv.vocab
    assert conv.vocab.words[:len(conv.trained_words)] == conv.trained_words
    assert model.transformer.wte.weight.size(0) == len(conv.vocab) == model.config.vocab_size
