import json
import subprocess
import sys

import pytest
import torch

import train
from configurator import ConfigError
from conftest import ROOT, tiny_train_config, torchrun_train
from checkpoint import CheckpointError, load_checkpoint
from common import atomic_save


def test_loss_decreases_on_shakespeare_char(char_data, tmp_path):
    cfg = tiny_train_config(char_data, tmp_path, max_iters=150, eval_interval=150, block_size=64,
                            n_embd=64, batch_size=16, lr_decay_iters=150)
    result = train.main(cfg)
    losses = result["losses"]
    assert losses[0] > 4.0  # ~ln(65): a uniform guess over the characters
    assert result["val_loss"] < 2.8 and losses[149] < losses[0] - 1.2
    # what a user gets in out_dir: a loadable checkpoint, the metrics log and the loss plot
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 150 and ckpt["config"]["max_iters"] == 150 and ckpt["meta"]["tokenizer"] == "char"
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["iter"] for l in lines if "loss" in l] == list(range(150))
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_resume_equals_uninterrupted_run(char_data, tmp_path):
    # dropout on, so the restored RNG state matters too
    common = dict(dropout=0.1, lr_decay_iters=40, eval_interval=20)
    full = train.main(tiny_train_config(char_data, tmp_path / "full", max_iters=40, **common))
    part = tmp_path / "part"
    train.main(tiny_train_config(char_data, part, max_iters=20, **common))
    resumed = train.main(tiny_train_config(char_data, part, max_iters=40, init_from="resume", **common))
    assert sorted(resumed["losses"]) == list(range(20, 40))
    for it in range(20, 40):
        assert resumed["losses"][it] == pytest.approx(full["losses"][it], rel=1e-6)
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)
    # the metrics log of the resumed run reads like one uninterrupted run
    iters = [json.loads(l)["iter"] for l in open(part / "metrics.jsonl") if "loss" in json.loads(l)]
    assert iters == list(range(40))


def test_gradient_accumulation_equals_one_big_batch(char_data, tmp_path):
    big = train.main(tiny_train_config(char_data, tmp_path / "a", max_iters=6, batch_size=8))
    acc = train.main(tiny_train_config(char_data, tmp_path / "b", max_iters=6, batch_size=4,
                                       gradient_accumulation_steps=2))
    for it in range(6):
        assert acc["losses"][it] == pytest.approx(big["losses"][it], rel=1e-5)


def test_resume_refuses_a_different_shape(char_data, tmp_path):
    train.main(tiny_train_config(char_data, tmp_path, max_iters=10))
    with pytest.raises(ConfigError, match="n_embd 32 -> 64"):
        train.main(tiny_train_config(char_data, tmp_path, max_iters=20, init_from="resume", n_embd=64))


def test_rotary_model_resumes_with_a_longer_context(char_data, tmp_path):
    """pos='rope' has no position table: a resume may change block_size (a long-context stage after short
    windows); training goes on from the weights reached, and the checkpoint records the new context.
    Learned positions keep their table's size."""
    first = train.main(tiny_train_config(char_data, tmp_path / "rope", max_iters=20, pos="rope", block_size=16))
    assert load_checkpoint(str(tmp_path / "rope" / "ckpt.pt"))["model_args"]["block_size"] == 16
    longer = train.main(tiny_train_config(char_data, tmp_path / "rope", max_iters=22, pos="rope", block_size=64,
                                          init_from="resume"))
    assert sorted(longer["losses"]) == [20, 21]
    assert longer["losses"][20] < first["losses"][0] - 0.5  # the trained weights, not a fresh model
    ckpt = load_checkpoint(str(tmp_path / "rope" / "ckpt.pt"))
    assert ckpt["model_args"]["block_size"] == 64 and ckpt["iter_num"] == 22
    train.main(tiny_train_config(char_data, tmp_path / "learned", max_iters=4, block_size=16))
    with pytest.raises(ConfigError, match="block_size 16 -> 64"):
        train.main(tiny_train_config(char_data, tmp_path / "learned", max_iters=8, block_size=64, init_from="resume"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    atomic_save({"model": {"w": torch.ones(3)}, "model_args": {}}, path)

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"model": {"w": torch.zeros(3)}, "model_args": {}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))  # the old one, intact


def test_corrupt_or_missing_checkpoint_gives_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"model": {"w": torch.ones(1000)}, "model_args": {}}, str(path))
    path.write_bytes(path.read_bytes()[:300])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_missing_dataset_names_the_prepare_command(tmp_path):
    from prepare import DataError
    with pytest.raises(DataError, match="prepare.py"):
        train.main(tiny_train_config(tmp_path / "nodata", tmp_path / "out"))


def test_cli_rejects_unknown_key_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "config/train_facts.py", "--n_layers=2"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert "unknown setting 'n_layers'" in r.stderr and "n_layer" in r.stderr
    assert "settings:" not in r.stdout  # failed before printing or doing anything


@pytest.mark.needs_data("gpt2/tiktoken_cache")
def test_finetune_from_local_gpt2_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from prepare import prepare
    hf_dir = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).save_pretrained(hf_dir)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    prepare("text", input=str(text), out_dir=str(tmp_path / "data" / "fox"))
    cfg = tiny_train_config(tmp_path / "data", tmp_path / "out", dataset="fox", init_from=str(hf_dir),
                            max_iters=10, block_size=32, n_layer=2)
    result = train.main(cfg)
    assert result["losses"][9] < result["losses"][0]
    ckpt = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert ckpt["model_args"]["vocab_size"] == 50257 and ckpt["model_args"]["block_size"] == 32


def test_wandb_offline(char_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train.main(tiny_train_config(char_data, tmp_path / "out", max_iters=3, wandb_log=True))
    assert any(p.name.startswith("offline-run") for p in (tmp_path / "wandb").iterdir())


@pytest.mark.slow
def test_ddp_two_processes_equal_one(char_data, tmp_path):
    common = dict(max_iters=10, gradient_accumulation_steps=4, batch_size=4, eval_interval=10)
    single = train.main(tiny_train_config(char_data, tmp_path / "one", **common))
    torchrun_train(dict(dataset="shakespeare_char", data_dir=char_data, out_dir=tmp_path / "two", device="cpu",
                        dtype="float32", n_layer=2, n_head=2, n_embd=32, block_size=32, eval_iters=4, log_interval=1,
                        learning_rate=3e-3, warmup_iters=5, min_lr=3e-4, seed=1234, **common))
    lines = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]
    ddp_losses = {l["iter"]: l["loss"] for l in lines if "loss" in l}
    assert sorted(ddp_losses) == list(range(10))
    for it in range(10):
        assert ddp_losses[it] == pytest.approx(single["losses"][it], rel=1e-4)
    val = [l["val_loss"] for l in lines if "val_loss" in l][-1]
    assert val == pytest.approx(single["val_loss"], rel=1e-4)
    # each rank's RNG state is kept, so a DDP run resumes exactly too
    assert len(load_checkpoint(str(tmp_path / "two" / "ckpt.pt"))["rng"]) == 2


@pytest.mark.slow
def test_compiled_training_saves_plain_names(char_data, tmp_path):
    train.main(tiny_train_config(char_data, tmp_path, max_iters=2, eval_interval=2, compile=True))
    keys = load_checkpoint(str(tmp_path / "ckpt.pt"))["model"].keys()
    assert "transformer.wte.weight" in keys and not any("_orig_mod" in k for k in keys)
