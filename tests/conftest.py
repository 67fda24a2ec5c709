"""Shared fixtures and the offline-data policy.

Most tests need no corpus: `char_data` is prepared from tests/fixtures/play.txt, a small made-up text
committed here (see tests/fixtures/make_play.py). Tests that need the real corpora or GPT-2's BPE files
carry `@pytest.mark.needs_data(...)`, naming what they read under MNEMO_DATA (the offline `shared/data`
folder; e.g. "mnist", "shakespeare/input.txt", "gpt2/tiktoken_cache" for tiktoken's GPT-2 files). They
read them through MNEMO_DATA only. Without it they are skipped with the reason, so a fresh clone with no
data passes; but where CI=true, or MNEMO_DATA is set, a missing folder or file fails them, so CI never
skips them silently.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(ROOT))

_DATA_ENV = os.environ.get("MNEMO_DATA", "").strip()
SHARED_DATA = Path(_DATA_ENV).resolve() if _DATA_ENV else None  # None: not given
IN_CI = os.environ.get("CI", "").strip().lower() == "true"
# tiktoken's offline cache: set before any test imports tiktoken
if SHARED_DATA is not None:
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "gpt2" / "tiktoken_cache"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s; deselect with -m 'not slow'")
    config.addinivalue_line(
        "markers", "needs_data(*paths): reads the offline corpora or GPT-2's BPE files under MNEMO_DATA "
        "(paths relative to it); skipped without MNEMO_DATA, failed where CI=true or MNEMO_DATA is set but "
        "incomplete; deselect with -m 'not needs_data'")


def missing_data(paths=()) -> str | None:
    """Why the offline data the paths name cannot be read (None: it can)."""
    if SHARED_DATA is None:
        return "MNEMO_DATA is not set (point it at the offline shared/data folder to run this test)"
    if not SHARED_DATA.is_dir():
        return f"MNEMO_DATA={_DATA_ENV}: folder {SHARED_DATA} not found"
    absent = [p for p in paths if not (SHARED_DATA / p).exists()]
    if absent:
        return f"MNEMO_DATA={_DATA_ENV}: {', '.join(absent)} not found in {SHARED_DATA}"
    return None


def require_data(paths=()):
    """Skips the running test when the data is missing, or fails it where CI=true or MNEMO_DATA is set."""
    why = missing_data(paths)
    if why is None:
        return
    if IN_CI or SHARED_DATA is not None:
        pytest.fail(f"needs offline data: {why}" + (" (CI=true: data tests must not be skipped)" if IN_CI else ""),
                    pytrace=False)
    pytest.skip(f"needs offline data: {why}")


def pytest_collection_modifyitems(config, items):
    # a test that asks for shared_data (directly or through another fixture) needs data, marked or not
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()) and item.get_closest_marker("needs_data") is None:
            item.add_marker(pytest.mark.needs_data())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # before any fixture is set up: a module fixture reading the corpus never runs without it
    paths = [p for mark in item.iter_markers("needs_data") for p in mark.args]
    if item.get_closest_marker("needs_data") is not None:
        require_data(paths)


def pytest_report_header(config):
    tiktoken = os.environ.get("TIKTOKEN_CACHE_DIR", "(not set)")
    if SHARED_DATA is None:
        state = "not set: tests marked needs_data are skipped" + (" (CI=true: they fail)" if IN_CI else "")
    else:
        state = f"{SHARED_DATA}" + ("" if SHARED_DATA.is_dir() else " (missing: tests marked needs_data fail)")
    return [f"MNEMO_DATA: {state}", f"TIKTOKEN_CACHE_DIR: {tiktoken}"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline shared/data folder, from MNEMO_DATA (tests using it are marked needs_data)."""
    require_data()
    return SHARED_DATA


@pytest.fixture(scope="session")
def play_text() -> Path:
    """tests/fixtures/play.txt: a made-up 48 KB play over Tiny Shakespeare's 65 characters, in the repo."""
    return FIXTURES / "play.txt"


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, play_text) -> Path:
    """data_dir holding shakespeare_char prepared from the committed play_text (no corpus needed)."""
    from prepare import prepare
    data_dir = tmp_path_factory.mktemp("data")
    meta = prepare("shakespeare_char", input=str(play_text), out_dir=str(data_dir / "shakespeare_char"))
    assert meta["vocab_size"] == 65  # the tests' numbers (a first loss ~ln(65)) rely on it
    return data_dir


@pytest.fixture(scope="session")
def dialog_data(tmp_path_factory):
    """data_dir holding the built-in dialogues (prepare.py dialogs)."""
    from prepare import prepare
    data_dir = tmp_path_factory.mktemp("data")
    prepare("dialogs", out_dir=str(data_dir / "dialogs"))
    return data_dir


def tiny_dialog_settings(data_dir, out_dir):
    """A seq2seq chatbot with a memory, small enough to train for a few iterations in seconds on CPU."""
    return dict(task="dialog", dataset="dialogs", data_dir=str(data_dir), out_dir=str(out_dir), device="cpu",
                dtype="float32", n_layer=1, n_enc_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4,
                mnm_heads=2, mnm_key_size=8, mnm_hidden=16, dialog_slots=8, max_iters=6, eval_interval=3,
                eval_iters=2, log_interval=1, learning_rate=3e-3, warmup_iters=2, seed=7)


def tiny_dialog_config(data_dir, out_dir, **overrides):
    from configurator import load_config
    from train import DialogConfig
    return load_config(DialogConfig, [], **{**tiny_dialog_settings(data_dir, out_dir), **overrides})


def tiny_train_config(data_dir, out_dir, **overrides):
    """A model small enough to train for a few dozen iterations in seconds on CPU."""
    from configurator import load_config
    from train import TrainConfig
    settings = dict(dataset="shakespeare_char", data_dir=str(data_dir), out_dir=str(out_dir), device="cpu",
                    dtype="float32", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8,
                    max_iters=20, eval_interval=10, eval_iters=4, log_interval=1, learning_rate=3e-3,
                    warmup_iters=5, min_lr=3e-4, seed=1234)
    settings.update(overrides)
    return load_config(TrainConfig, [], **settings)


def torchrun_train(settings: dict, nproc: int = 2):
    """train.py under torchrun with `nproc` CPU processes (gloo); fails the test with both output tails."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        "train.py", *[f"--{k}={v}" for k, v in settings.items()]], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-3000:]}"


@pytest.fixture(autouse=True)
def _restore_memory_knobs():
    """The MNM's training knobs are class attributes that a test may change: put them back after every
    test, so that one test changes no other."""
    import memory
    knobs = [(memory.MNM, "write_loss_weight"), (memory.MNM, "beta_offset")]
    saved = [(cls, name, getattr(cls, name)) for cls, name in knobs]
    yield
    for cls, name, value in saved:
        setattr(cls, name, value)
