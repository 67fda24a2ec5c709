"""Every bad input to training gets a clear error naming the setting and the fix, before any work, and
nothing is lost: settings out of range (every setting of every training program and of bench.py),
settings of another program, init_from typos, vocabularies that do not match the data, a new run
over a checkpoint, leftover temp files, torn or malformed metrics.jsonl, checkpoints of older
code, and runs killed at random points while they write."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, fields

import pytest

import bench
import train
from checkpoint import load_checkpoint
from common import atomic_save
from configurator import ConfigError, load_config
from conftest import ROOT, tiny_train_config
from prepare import DataError
from runs import OutDirError, read_metrics
from tasks import TaskConfig
from train import DialogConfig, TrainConfig

CLASSES = (TrainConfig, DialogConfig, TaskConfig, bench.BenchConfig)
FREE_TEXT = {"out_dir", "data_dir", "dataset", "datasets", "wandb_project", "wandb_run_name", "bench_json",
             "knn_scale_dir", "knn_config"}


def settings_of(kinds):
    """(class, setting) for every setting of the training programs and bench.py whose type is one of kinds."""
    out = []
    for cls in CLASSES:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            tp = hints[f.name]
            base = {a for a in typing.get_args(tp) if a is not type(None)} or {tp}
            if base & set(kinds) and f.name not in FREE_TEXT:
                out.append(pytest.param(cls, f.name, id=f"{cls.__name__}.{f.name}"))
    return out


def refused(cls, **settings) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(cls, [], **settings)
    return str(e.value)


# -----------------------------------------------------------------------------
# settings

@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_defaults_are_valid(cls):
    load_config(cls, [])


@pytest.mark.parametrize("cls,name", settings_of([int, float]))
def test_every_number_setting_is_range_checked(cls, name):
    """A hugely negative value (and NaN for a float) is out of range for every number setting: the message
    names the setting and the range it must be in."""
    tp = typing.get_type_hints(cls)[name]
    bad = [-10 ** 6] if int in (typing.get_args(tp) or (tp,)) else [-1e9, float("nan")]
    if typing.get_origin(tp) is list:
        bad = [[3, v] for v in bad]
    for value in bad:
        message = refused(cls, **{name: value})
        assert name in message and "must be" in message, message


@pytest.mark.parametrize("cls,name", settings_of([str, bool]))  # list[str] too
def test_every_choice_setting_is_checked(cls, name):
    tp = typing.get_type_hints(cls)[name]
    if tp is bool:
        message = refused(cls, **{name: "maybe"})
        assert f"{name} must be True or False" in message
        return
    message = refused(cls, **{name: ["nonsense"] if typing.get_origin(tp) is list else "nonsense"})
    assert name in message and ("must be" in message or "unknown" in message or "is not" in message), message


@pytest.mark.parametrize("cls,settings,needle", [
    (TrainConfig, dict(dropout=1.0), "dropout must be in [0, 1)"),
    (TrainConfig, dict(beta2=1.0), "beta2 must be in [0, 1)"),
    (TrainConfig, dict(learning_rate=0.0), "learning_rate must be > 0"),
    (TrainConfig, dict(batch_size=0), "batch_size must be >= 1"),
    (TrainConfig, dict(block_size=0), "block_size must be >= 1"),
    (TrainConfig, dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be >= 1"),
    (TrainConfig, dict(eval_interval=0), "eval_interval must be >= 1"),
    (TrainConfig, dict(eval_iters=0), "eval_iters must be >= 1"),
    (TrainConfig, dict(log_interval=0), "log_interval must be >= 1"),
    (TrainConfig, dict(max_iters=-1), "max_iters must be >= 0"),
    (TrainConfig, dict(n_head=0), "n_head must be >= 1"),
    (TrainConfig, dict(n_embd=30, n_head=4), "n_embd must be n_head times the head size"),
    (TrainConfig, dict(knn_layer=6, loader="docs"), "must be < n_layer=6"),
    (TrainConfig, dict(mnm_pool=True, mnm_shift=True), "use one of the two"),
    (TrainConfig, dict(mnm_write_budget=0), "mnm_write_budget must be > 0"),
    (TrainConfig, dict(mnm_key_spread=-1), "mnm_key_spread must be >= 0"),
    (TrainConfig, dict(mnm_layer=1, mnm_pool=True, mnm_key_spread=1.0), "mnm_key_spread spreads the keys"),
    (TrainConfig, dict(knn_mix="sum"), "knn_mix must be 'gate' or 'joint'"),
    (TrainConfig, dict(device="gpu"), "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    (TrainConfig, dict(dtype="fp16"), "dtype must be 'auto', 'float32', 'bfloat16' or 'float16'"),
    (DialogConfig, dict(vocab_capacity=0), "vocab_capacity must be >= 1"),
    (DialogConfig, dict(memory="lstm"), "memory must be 'mnm' or 'none'"),
    (TaskConfig, dict(dtype="bfloat16"), "dtype must be 'auto' or 'float32'"),
    (TaskConfig, dict(min_len=4, max_len=3), "min_len <= max_len"),
    (bench.BenchConfig, dict(suite=["knn"], knn_layer=6), "0 <= knn_layer < n_layer=6"),
    (bench.BenchConfig, dict(gen_batch_sizes=[1, 0]), "gen_batch_sizes[1]=0 is out of range"),
    (bench.BenchConfig, dict(suite=["smollm2"], knn_config="nope.py"), "knn_config='nope.py' is not a file"),
    (bench.BenchConfig, dict(suite=["knn", "smollm2"]), "suite 'smollm2' times a pretrained model"),
    (bench.BenchConfig, dict(pretrained="resume"), "pretrained='resume' is not pretrained weights"),
    (bench.BenchConfig, dict(mnm_value="token"), "set mnm_shift=True"),
    (bench.BenchConfig, dict(mnm_pool=True, mnm_shift=True), "use one of the two"),
    (bench.BenchConfig, dict(suite=["recipes"], mnm_layer=6), "mnm_layer < n_layer=6"),
    (bench.BenchConfig, dict(suite=["recipes"], mnm_heads=5), "mnm_heads=5 must divide n_embd=384"),
])
def test_limits_are_named_with_the_allowed_range(cls, settings, needle):
    assert needle in refused(cls, **settings)


def test_a_setting_of_another_program_names_its_owner():
    with pytest.raises(ConfigError, match=r"'bits' on the command line belongs to task='copy'.*\(TaskConfig\), "
                                          r"not to task='lm' \(TrainConfig\)"):
        train.load_settings(["config/train_facts.py", "--bits=4"])
    with pytest.raises(ConfigError, match=r"'knn_layer' on the command line belongs to task='lm' \(TrainConfig\), "
                                          r"not to task='dialog'"):
        train.load_settings(["config/train_dialogs.py", "--knn_layer=1"])
    with pytest.raises(ConfigError, match=r"'wandb_log' in the keyword arguments belongs to task='lm' "
                                          r"\(TrainConfig\) and task='dialog' \(DialogConfig\), not to task='copy'"):
        train.load_settings([], task="copy", wandb_log=True)
    with pytest.raises(ConfigError, match="unknown task 'sort'; choose one of 'lm', 'dialog', 'copy'"):
        train.load_settings(["--task=sort"])
    with pytest.raises(ConfigError, match="did you mean learning_rate"):  # a typo is still a typo
        train.load_settings(["config/train_dnc_copy.py", "--learning_rat=1"])


def test_the_program_comes_from_the_config_file_or_the_command_line(tmp_path):
    assert type(train.load_settings(["config/train_dnc_copy.py"])) is TaskConfig
    assert type(train.load_settings(["config/train_dialogs.py"])) is DialogConfig
    assert type(train.load_settings(["config/train_facts.py"])) is TrainConfig
    assert type(train.load_settings(["config/train_facts.py", "--task=dialog"])) is DialogConfig


def test_a_renamed_setting_names_the_new_name():
    @dataclass
    class Demo:
        RENAMED = {"lr": "learning_rate"}
        learning_rate: float = 0.1

    with pytest.raises(ConfigError, match="'lr' on the command line was renamed to 'learning_rate'"):
        load_config(Demo, ["--lr=0.2"])


def test_bench_reads_a_training_config_and_still_refuses_typos(capsys):
    cfg = load_config(bench.BenchConfig, ["config/train_facts.py"], ignore=bench.TRAINING_ONLY)
    assert (cfg.n_layer, cfg.block_size) == (4, 512) and "does not use out_dir" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="did you mean n_layer"):
        load_config(bench.BenchConfig, ["--n_layers=2"], ignore=bench.TRAINING_ONLY)
    # every setting of a training program is either bench's or one it reads past
    training = {f.name for cls in (TrainConfig, DialogConfig, TaskConfig) for f in fields(cls)}
    assert training - {f.name for f in fields(bench.BenchConfig)} == set(bench.TRAINING_ONLY)


# -----------------------------------------------------------------------------
# init_from

@pytest.mark.parametrize("value,needle", [
    ("scrach", "did you mean 'scratch'"),
    ("resum", "did you mean 'resume'"),
    ("gtp2", "is not 'scratch', 'resume'"),
    ("missing/model.gguf", "or a .gguf file"),
])
def test_init_from_typos_are_refused(value, needle):
    assert needle in refused(TrainConfig, init_from=value)


def test_init_from_accepts_what_from_pretrained_reads(tmp_path):
    for value in ("scratch", "resume", "gpt2", "gpt2-medium", "openai-community/gpt2", str(tmp_path)):
        load_config(TrainConfig, [], init_from=value)
    assert "'scratch' or 'resume'" in refused(DialogConfig, init_from="gpt2")


def test_init_from_typo_on_the_command_line_is_one_line_not_a_traceback():
    r = subprocess.run([sys.executable, "train.py", "config/train_facts.py", "--init_from=scrach"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "error: init_from='scrach' is not" in r.stderr and "did you mean 'scratch'" in r.stderr


# -----------------------------------------------------------------------------
# vocabulary vs data

def test_data_with_ids_beyond_meta_vocab_size_is_refused(char_data, tmp_path):
    shutil.copytree(char_data / "shakespeare_char", tmp_path / "data" / "bad")
    meta_path = tmp_path / "data" / "bad" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["vocab_size"] = 20  # the data holds ids up to 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"train.bin holds token id 6\d, but its meta.json says vocab_size=20.*"
                                        r"prepare the dataset again"):
        train.main(tiny_train_config(tmp_path / "data", tmp_path / "out", dataset="bad"))
    assert not (tmp_path / "out" / "ckpt.pt").exists()


@pytest.mark.needs_data("gpt2/tiktoken_cache")  # the corpus is tokenized with GPT-2's BPE
def test_meta_vocab_larger_than_the_model_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from prepare import prepare
    hf_dir = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=300)).save_pretrained(hf_dir)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    prepare("text", input=str(text), out_dir=str(tmp_path / "data" / "fox"))  # GPT-2 tokens: vocab_size 50257
    with pytest.raises(DataError, match="meta.json says vocab_size=50257, more token ids than the model's 300"):
        train.main(tiny_train_config(tmp_path / "data", tmp_path / "out", dataset="fox", init_from=str(hf_dir)))


# -----------------------------------------------------------------------------
# out_dir: nothing lost

@pytest.fixture
def finished_run(char_data, tmp_path):
    """out_dir of a finished 6-iteration run, and its ckpt.pt and metrics.jsonl bytes."""
    out = tmp_path / "out"
    train.main(tiny_train_config(char_data, out, max_iters=6, eval_interval=3))
    return out, (out / "ckpt.pt").read_bytes(), (out / "metrics.jsonl").read_bytes()


def test_a_new_run_refuses_to_overwrite_a_checkpoint(char_data, finished_run):
    out, ckpt, metrics = finished_run
    with pytest.raises(ConfigError, match=r"already holds a checkpoint.*--init_from=resume.*--overwrite=True"):
        train.main(tiny_train_config(char_data, out, max_iters=4))
    assert (out / "ckpt.pt").read_bytes() == ckpt and (out / "metrics.jsonl").read_bytes() == metrics
    r = subprocess.run([sys.executable, "train.py", f"--data_dir={char_data}", "--dataset=shakespeare_char",
                        f"--out_dir={out}", "--device=cpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "--overwrite=True" in r.stderr and "Traceback" not in r.stderr
    train.main(tiny_train_config(char_data, out, max_iters=4, eval_interval=2, overwrite=True))
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 4


def test_leftover_temp_files_are_removed_with_a_note(char_data, finished_run, capsys):
    out, _, _ = finished_run
    (out / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")
    (out / "metrics.jsonl.tmp").write_text('{"iter": 1')
    train.main(tiny_train_config(char_data, out, max_iters=8, eval_interval=3, init_from="resume"))
    assert not list(out.glob("*.tmp"))
    assert f"removed {out / 'ckpt.pt.tmp'}" in capsys.readouterr().out


def test_a_torn_last_metrics_line_is_dropped_on_resume(char_data, finished_run, capsys):
    out, _, _ = finished_run
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iter": 6, "loss": 2.')  # the run was killed mid-write
    train.main(tiny_train_config(char_data, out, max_iters=9, eval_interval=3, init_from="resume"))
    assert "dropped the torn last line" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines if "loss" in r] == list(range(9))


def test_a_malformed_metrics_line_stops_the_resume_and_keeps_everything(char_data, finished_run):
    out, ckpt, _ = finished_run
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = "not json\n"
    (out / "metrics.jsonl").write_text("".join(lines))
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(OutDirError, match=r"metrics.jsonl line 3 is not a metrics record.*delete or mend that line"):
        train.main(tiny_train_config(char_data, out, max_iters=9, init_from="resume"))
    assert (out / "metrics.jsonl").read_bytes() == before and (out / "ckpt.pt").read_bytes() == ckpt
    train.plot_losses(str(out / "metrics.jsonl"), str(out / "loss.png"))  # a plot reads past it
    assert (out / "loss.png").stat().st_size > 1000


def test_checkpoints_of_the_older_code_resume(char_data, finished_run):
    """Checkpoints written before the settings were split (one flat config of every program's settings)
    and before memory_args was kept apart resume exactly like new ones."""
    out, _, _ = finished_run
    shutil.copytree(out, out.parent / "new")
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    ckpt["config"] = {**ckpt["config"], "bits": 8, "memory": "mnm", "dialog_slots": 16, "methods": ["ewc"]}
    ckpt["model_args"] = {**ckpt["model_args"], **ckpt.pop("memory_args")}  # the older layout
    atomic_save(ckpt, str(out / "ckpt.pt"))
    old = train.main(tiny_train_config(char_data, out, max_iters=9, eval_interval=3, init_from="resume"))
    new = train.main(tiny_train_config(char_data, out.parent / "new", max_iters=9, eval_interval=3, init_from="resume"))
    assert old["losses"] == new["losses"] and old["val_loss"] == new["val_loss"]


def test_a_dialog_checkpoint_is_refused_by_the_lm_program(finished_run, char_data):
    out, _, _ = finished_run
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    ckpt["model_args"]["model_type"] = "seq2seq"
    atomic_save(ckpt, str(out / "ckpt.pt"))
    with pytest.raises(ConfigError, match="holds a seq2seq model; use the task it was trained with"):
        train.main(tiny_train_config(char_data, out, max_iters=9, init_from="resume"))


# -----------------------------------------------------------------------------
# killed while writing

KILL_SETTINGS = dict(dataset="shakespeare_char", device="cpu", dtype="float32", n_layer=1, n_head=2, n_embd=16,
                     block_size=16, batch_size=4, max_iters=30, eval_interval=2, eval_iters=1, log_interval=1,
                     learning_rate=3e-3, warmup_iters=5, min_lr=3e-4, seed=5)


def line_count(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_runs_killed_while_writing_lose_nothing(char_data, tmp_path):
    """SIGKILL training at random points (checkpoints and metrics are written every other iteration),
    resume each time: every checkpoint left loads, metrics.jsonl always reads, and the run finishes
    with the losses of an uninterrupted one."""
    out = tmp_path / "out"
    args = [sys.executable, "train.py", f"--data_dir={char_data}", f"--out_dir={out}",
            *[f"--{k}={v}" for k, v in KILL_SETTINGS.items()]]
    rng, killed = random.Random(0), 0
    for cycle in range(3):
        init = "resume" if (out / "ckpt.pt").exists() else "scratch"
        start = line_count(out / "metrics.jsonl")
        p = subprocess.Popen(args + [f"--init_from={init}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wait_for = rng.randint(2, 10)  # records written by this run before the kill
        deadline = time.time() + 120
        while p.poll() is None and line_count(out / "metrics.jsonl") < start + wait_for and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.03))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        p.wait()
        assert p.returncode in (0, -signal.SIGKILL), p.stderr.read()
        if (out / "ckpt.pt").exists():
            load_checkpoint(str(out / "ckpt.pt"))  # never torn
        read_metrics(str(out / "metrics.jsonl"))  # at most a torn last line
    assert killed >= 2
    r = subprocess.run(args + ["--init_from=resume"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(out.glob("*.tmp"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["iter"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == list(range(30))
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 30
    full = train.main(tiny_train_config(char_data, tmp_path / "full", **KILL_SETTINGS))
    for it in range(30):
        assert losses[it] == pytest.approx(full["losses"][it], rel=1e-4)


def test_live_temp_files_are_kept_and_stale_ones_removed(tmp_path):
    """A temp file whose writer is alive (NAME.PID.tmp) is another run's work in progress: kept."""
    from common import remove_stale_temps
    live = tmp_path / f"ckpt.pt.{os.getpid()}.tmp"
    live.write_bytes(b"in progress")
    stale = tmp_path / "ckpt.pt.999999999.tmp"
    stale.write_bytes(b"killed")
    removed = remove_stale_temps(tmp_path)
    assert [p for p, _ in removed] == [str(stale)] and live.exists()
