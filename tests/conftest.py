"""Shared fixtures. Offline data comes from MNEMO_DATA (default ../shared/data, relative to the repo root)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = Path(os.environ.get("MNEMO_DATA", ROOT.parent / "shared" / "data")).resolve()
# tiktoken's offline cache: set before any test imports tiktoken
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "gpt2" / "tiktoken_cache"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s; deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"offline data folder {SHARED_DATA} not found: set MNEMO_DATA to the shared/data folder")
    return SHARED_DATA


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shared_data) -> Path:
    """data_dir holding shakespeare_char prepared from the offline copy."""
    from prepare import prepare
    data_dir = tmp_path_factory.mktemp("data")
    prepare("shakespeare_char", input=str(shared_data / "shakespeare" / "input.txt"),
            out_dir=str(data_dir / "shakespeare_char"))
    return data_dir


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
