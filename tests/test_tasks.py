"""tasks.py through train.main: algorithmic tasks (DNC against an LSTM), the replay buffer, EWC,
permuted MNIST from the offline IDX files, and a GPT trained on one corpus after another."""
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import tasks
import train
from configurator import ConfigError
from checkpoint import load_checkpoint
from dnc import DNC
from tasks import ReplayBuffer
from prepare import DataError


def task_config(tmp_path, **overrides):
    settings = dict(out_dir=str(tmp_path), device="cpu", seed=1234, log_interval=10, eval_interval=50,
                    eval_iters=4, batch_size=16, weight_decay=0.0, decay_lr=False)
    settings.update(overrides)
    return train.load_settings([], **settings)


# -----------------------------------------------------------------------------
# algorithmic tasks

def test_copy_sequences_ask_for_the_pattern_back(tmp_path):
    cfg = task_config(tmp_path, task="copy", bits=4, min_len=1, max_len=5)
    x, y, mask = tasks.make_batch(cfg, np.random.default_rng(0), 32)
    assert x.shape[2] == 5 and y.shape[2] == 4
    lengths = set()
    for i in range(32):
        L = int(mask[i].sum())
        lengths.add(L)
        assert x[i, L, 4] == 1 and x[i, :, 4].sum() == 1  # one delimiter, right after the pattern
        torch.testing.assert_close(y[i, L + 1:2 * L + 1], x[i, :L, :4])  # the answer is the pattern
        assert mask[i, L + 1:2 * L + 1].all() and x[i, L + 1:].abs().sum() == 0  # blank input while answering
    assert lengths == {1, 2, 3, 4, 5}
    x2, _, _ = tasks.make_batch(cfg, np.random.default_rng(0), 32)
    assert torch.equal(x, x2)  # a pure function of the generator's seed


def test_repeat_copy_and_assoc_recall_sequences(tmp_path):
    cfg = task_config(tmp_path, task="repeat_copy", bits=3, min_len=2, max_len=3, min_repeats=1, max_repeats=3)
    x, y, mask = tasks.make_batch(cfg, np.random.default_rng(1), 16)
    for i in range(16):
        L = int(x[i, :, 3].argmax())  # the delimiter step
        reps = round(x[i, L, 4].item() * 3)
        T = L + 1 + L * reps + 1
        assert int(mask[i].sum()) == L * reps + 1 and 1 <= reps <= 3
        torch.testing.assert_close(y[i, L + 1:T - 1, :3], x[i, :L, :3].repeat(reps, 1))
        assert y[i, T - 1, 3] == 1 and y[i, :, 3].sum() == 1  # the end marker, once, at the end
    cfg = task_config(tmp_path, task="assoc_recall", bits=4, min_len=2, max_len=4, item_len=2)
    x, y, mask = tasks.make_batch(cfg, np.random.default_rng(2), 16)
    for i in range(16):
        starts = torch.nonzero(x[i, :, 4]).flatten().tolist()  # item delimiters
        items = [x[i, s + 1:s + 3, :4] for s in starts]
        q0, q1 = torch.nonzero(x[i, :, 5]).flatten().tolist()  # the query sits between these
        query = x[i, q0 + 1:q1, :4]
        q = next(k for k, item in enumerate(items) if torch.equal(item, query))
        answer_at = torch.nonzero(mask[i]).flatten()
        torch.testing.assert_close(y[i, answer_at], items[q + 1])


def test_loss_and_bits_wrong_by_hand():
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    logits = torch.tensor([[[5.0, -5.0], [5.0, 5.0], [-5.0, -5.0]]])  # step 1: one bit wrong, step 2: both
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # step 2 is padding
    assert tasks.bits_wrong(logits, y, mask).tolist() == [1.0]
    expected = F.binary_cross_entropy_with_logits(logits[0, :2], y[0, :2], reduction="sum")
    assert tasks.masked_bce(logits, y, mask).item() == pytest.approx(expected.item())


def test_lstm_baseline_has_the_dnc_parameter_count(tmp_path):
    cfg = task_config(tmp_path, task="copy", memory_slots=16, word_size=16, read_heads=4, hidden_size=64)
    dnc = DNC(tasks.dnc_config(cfg))
    n = tasks.n_params(dnc)
    lstm = tasks.LSTMBaseline(9, 8, tasks.matched_lstm_hidden(9, 8, n))
    assert abs(tasks.n_params(lstm) - n) / n < 0.01


def test_copy_run_trains_both_models_and_writes_results(tmp_path):
    """A short copy run through train.main: both models train on the same batches, the DNC's bits
    wrong fall, and out_dir holds the results, the plot and a loadable checkpoint."""
    cfg = task_config(tmp_path, task="copy", bits=4, min_len=1, max_len=4, memory_slots=8, word_size=8,
                      read_heads=1, hidden_size=32, learning_rate=3e-3, max_iters=200, eval_interval=100, grad_clip=10.0)
    result = train.main(cfg)
    res = json.loads((tmp_path / "results.json").read_text())
    first, last = res["history"][0]["bits"], res["history"][-1]["bits"]
    assert first["dnc"] > 4 and last["dnc"] < first["dnc"] / 2  # a random guess gets half the bits wrong
    assert result["bits_wrong"] == last and set(last) == {"dnc", "lstm"}
    assert abs(res["params"]["lstm"] - res["params"]["dnc"]) / res["params"]["dnc"] < 0.05  # +-1 unit: ~3% here
    assert (tmp_path / "bits.png").stat().st_size > 1000
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 200 and set(ckpt["model"]) == {"dnc", "lstm"}


def test_dnc_with_a_gpt_block_controller_learns_copy(tmp_path):
    cfg = task_config(tmp_path, task="copy", bits=4, min_len=1, max_len=4, memory_slots=8, word_size=8, read_heads=1,
                      controller="gpt", hidden_size=32, n_head=2, block_size=16, baseline=False,
                      learning_rate=3e-3, max_iters=100, eval_interval=100, grad_clip=10.0)
    train.main(cfg)
    history = json.loads((tmp_path / "results.json").read_text())["history"]
    assert history[0]["bits"]["dnc"] > 4 and history[-1]["bits"]["dnc"] < history[0]["bits"]["dnc"] / 2


def test_algorithmic_resume_equals_uninterrupted_run(tmp_path):
    common = dict(task="assoc_recall", bits=3, min_len=2, max_len=3, item_len=1, memory_slots=6, word_size=4,
                  read_heads=2, hidden_size=16, max_iters=8, eval_interval=4, log_interval=1, eval_iters=1,
                  batch_size=4, optimizer="rmsprop", learning_rate=1e-3)
    full = train.main(task_config(tmp_path / "full", **common))
    train.main(task_config(tmp_path / "part", **{**common, "max_iters": 4}))
    resumed = train.main(task_config(tmp_path / "part", init_from="resume", **common))
    for name in ("dnc", "lstm"):
        assert sorted(resumed["losses"][name]) == [4, 5, 6, 7]
        for it in range(4, 8):
            assert resumed["losses"][name][it] == pytest.approx(full["losses"][name][it], rel=1e-6)
    with pytest.raises(ConfigError, match="use the settings it was trained with"):
        train.main(task_config(tmp_path / "part", init_from="resume", **{**common, "word_size": 8}))


@pytest.mark.parametrize("overrides,message", [
    (dict(task="sort"), "unknown task 'sort'"),
    (dict(task="assoc_recall", min_len=1), "min_len >= 2 items"),
    (dict(task="copy", min_len=5, max_len=3), "min_len <= max_len"),
    (dict(task="copy", sparse_links=40), "sparse_links must be between 0"),
    (dict(task="copy", optimizer="adam"), "optimizer must be"),
    (dict(task="pmnist", replay_store=64, batch_size=32), "replay_store"),
    (dict(task="pmnist", methods=["replay", "gem"], batch_size=32), "methods must be some of"),
    (dict(task="pmnist", replay_policy="fifo", batch_size=32), "replay_policy must be 'ring' or 'reservoir'"),
    (dict(task="lm_sequence", batch_size=32), "lm_sequence needs datasets"),
    (dict(task="pmnist", init_from="resume", batch_size=32), "cannot resume"),
])
def test_bad_task_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train.main(task_config(tmp_path, **overrides))


# -----------------------------------------------------------------------------
# replay buffer and EWC

def test_replay_buffer_never_samples_unfilled_slots():
    buf = ReplayBuffer(100, "ring", seed=0)
    buf.add(torch.arange(1, 4).float()[:, None], torch.arange(1, 4))
    x, y = buf.sample(1000)
    assert len(buf) == 3 and set(y.tolist()) == {1, 2, 3}  # never the zeros of the 97 empty slots
    torch.testing.assert_close(x[:, 0], y.float())  # fields stay paired
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(5).sample(1)
    with pytest.raises(ValueError, match="same fields"):
        buf.add(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))


def test_ring_buffer_keeps_the_newest():
    buf = ReplayBuffer(4, "ring")
    for start in (0, 3, 6):
        buf.add(torch.arange(start, start + 3))
    assert len(buf) == 4 and sorted(buf.slots[0].tolist()) == [5, 6, 7, 8]


def test_reservoir_keeps_every_example_with_equal_probability():
    capacity, offered, trials = 10, 50, 2000
    counts = np.zeros(offered)
    for trial in range(trials):
        buf = ReplayBuffer(capacity, "reservoir", seed=trial)
        for start in range(0, offered, 5):  # offered in batches, as training does
            buf.add(torch.arange(start, start + 5))
        counts[buf.slots[0].numpy()] += 1
        assert len(set(buf.slots[0].tolist())) == capacity
    p = counts / trials  # each should be kept with probability 10 / 50
    assert np.abs(p - capacity / offered).max() < 0.04  # ~4.5 standard errors
    assert p[:10].mean() == pytest.approx(0.2, abs=0.02) and p[-10:].mean() == pytest.approx(0.2, abs=0.02)


def test_fisher_matches_a_loop_over_examples():
    torch.manual_seed(0)
    model = tasks.classifier("mlp")
    x = torch.randn(6, 784)
    nll = lambda logits, y: F.cross_entropy(logits, y, reduction="none")
    fisher = tasks.fisher_diagonal(model, nll, x, torch.Generator().manual_seed(3), chunk_size=4)
    with torch.no_grad():
        y = torch.multinomial(torch.softmax(model(x), -1), 1, generator=torch.Generator().manual_seed(3))[:, 0]
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(6):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for k, p in model.named_parameters():
            expected[k] += p.grad ** 2 / 6
    for k in expected:
        torch.testing.assert_close(fisher[k], expected[k], atol=1e-7, rtol=1e-4)


def test_ewc_penalty_is_the_sum_of_per_task_quadratics():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ewc = tasks.EWC(lam=4.0)
    anchors = []
    for _ in range(3):
        fisher = {k: torch.rand_like(p) for k, p in model.named_parameters()}
        ewc.consolidate(model, fisher)
        anchors.append((fisher, {k: p.detach().clone() for k, p in model.named_parameters()}))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    explicit = sum(0.5 * 4.0 * (f[k] * (p - theta[k]) ** 2).sum() for f, theta in anchors
                   for k, p in model.named_parameters())
    assert ewc.penalty(model).item() == pytest.approx(explicit.item(), rel=1e-5)
    assert tasks.EWC(1.0).penalty(model) == 0.0


# -----------------------------------------------------------------------------
# permuted MNIST and the language-model sequence

@pytest.mark.needs_data("mnist")
def test_mnist_idx_files_read_offline(shared_data, tmp_path):
    images = tasks.read_idx(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")
    labels = tasks.read_idx(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).min() > 800 and images.max() == 255
    x_train, y_train, x_test, y_test, source = tasks.load_mnist(shared_data, seed=0)
    assert x_train.shape == (8000, 784) and x_test.shape == (2000, 784) and "split 8000/2000" in source
    # the two parts are disjoint: no test digit is also a training digit
    assert not set(map(bytes, x_test[:200])) & set(map(bytes, x_train))
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") + b"\x00" * 8 + b"\x01" * 10)
    with pytest.raises(DataError, match="truncated"):
        tasks.read_idx(bad)
    bad.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(DataError, match="not an IDX file"):
        tasks.read_idx(bad)


@pytest.mark.needs_data("mnist")
def test_permuted_mnist_replay_remembers_what_finetuning_forgets(shared_data, tmp_path):
    """Three tasks, every method on the same batches: the matrix, the running average, the JSON
    and the plot; replay keeps the first task better than plain fine-tuning."""
    cfg = task_config(tmp_path, task="pmnist", data_dir=str(shared_data), n_tasks=3, classifier="linear",
                      optimizer="sgd", learning_rate=0.5, batch_size=32, max_iters=300, log_interval=1000,
                      replay_every=30, replay_store=32, replay_batch=32, replay_capacity=1000, ewc_samples=100,
                      ewc_lambda=2.0, grad_clip=0.0)
    res = train.main(cfg)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["methods"].keys() == res["methods"].keys() == {"finetune", "ewc", "replay"}
    for method, r in res["methods"].items():
        assert np.array(r["matrix"]).shape == (3, 3)
        assert r["running_average"][-1] == pytest.approx(np.mean(r["final"]))
        assert r["running_average"][0] == r["matrix"][0][0] > 0.8  # one task: learnt
    replay, finetune = res["methods"]["replay"], res["methods"]["finetune"]
    assert replay["stored"] == 3 * 10 * 32  # 10 stores of 32 rows per task
    assert replay["final"][0] > finetune["final"][0] + 0.05
    assert (tmp_path / "continual.png").stat().st_size > 1000


def test_language_model_sequence_with_and_without_replay(tmp_path):
    from prepare import prepare
    # two char-level corpora with the same characters (so the same tokenizer), the second the first reversed
    text = "the cat sat on the mat and the dog sat on the log. " * 100
    for name, corpus in (("a", text), ("b", text[::-1])):
        (tmp_path / f"{name}.txt").write_text(corpus)
        prepare("text", input=str(tmp_path / f"{name}.txt"), tokenizer="char", out_dir=str(tmp_path / "data" / name))
    cfg = task_config(tmp_path / "out", task="lm_sequence", data_dir=str(tmp_path / "data"), datasets=["a", "b"],
                      methods=["finetune", "replay"], n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=8,
                      max_iters=60, learning_rate=1e-2, replay_every=5, replay_store=4, replay_batch=8,
                      eval_iters=4, log_interval=100)
    res = train.main(cfg)
    finetune, replay = (np.array(res["methods"][m]["matrix"]) for m in ("finetune", "replay"))
    for m in (finetune, replay):
        assert m.shape == (2, 2) and np.isfinite(m).all()
        assert m[0, 0] < m[0, 1] - 0.5  # after corpus a only, a is far easier than the unseen b
    assert finetune[1, 0] > finetune[0, 0] + 0.5  # training on b alone forgets a
    assert replay[1, 0] < finetune[1, 0] - 0.3  # replaying a's windows keeps much of it
    assert res["methods"]["replay"]["stored"] == 2 * 12 * 4
    assert json.loads((tmp_path / "out" / "results.json").read_text())["score"] == "val loss"


@pytest.mark.needs_data("mnist")
def test_diverging_continual_training_stops_with_a_clear_error(shared_data, tmp_path):
    # SGD on a penalty this stiff overshoots further every step: lr * lambda * Fisher >> 2
    cfg = task_config(tmp_path, task="pmnist", data_dir=str(shared_data), n_tasks=2, optimizer="sgd",
                      learning_rate=0.5, max_iters=50, batch_size=32, methods=["ewc"], ewc_lambda=1e6,
                      ewc_samples=50, grad_clip=0.0)
    with pytest.raises(FloatingPointError, match="diverged during task 1; lower learning_rate or ewc_lambda"):
        train.main(cfg)
