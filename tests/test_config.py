from dataclasses import dataclass, field
from pathlib import Path

import pytest

from configurator import ConfigError, load_config
from train import PROGRAMS, TrainConfig, load_settings

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Demo:
    dropout: float = 0.1
    n_layer: int = 2
    knn: list[int] = field(default_factory=list)
    top_k: int | None = 200
    name: str = "x"
    compile: bool = False


def test_typed_overrides():
    cfg = load_config(Demo, ["--dropout=0", "--knn=[0,0,5]", "--top_k=None", "--name=facts", "--compile=true"])
    assert cfg.dropout == 0.0 and isinstance(cfg.dropout, float)
    assert cfg.knn == [0, 0, 5]
    assert cfg.top_k is None
    assert cfg.name == "facts"
    assert cfg.compile is True
    assert load_config(Demo, ["--compile=False", "--top_k=50"]).compile is False
    assert load_config(Demo, ["--top_k=50"]).top_k == 50


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nn_layer = 2 * 3\ndropout = 0\n_private = 5\nname = 'run-' + str(math.floor(1.5))\n")
    cfg = load_config(Demo, [str(f), "--n_layer=4"])
    assert cfg.n_layer == 4 and cfg.dropout == 0.0 and cfg.name == "run-1"


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown setting 'n_layers'.*did you mean n_layer"):
        load_config(Demo, ["--n_layers=3"])
    f = tmp_path / "c.py"
    f.write_text("dropuot = 0.2\n")
    with pytest.raises(ConfigError, match=r"'dropuot' in .*c\.py.*did you mean dropout"):
        load_config(Demo, [str(f)])
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(TrainConfig, ["--learning_rat=1e-3"])


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match="n_layer must be a int"):
        load_config(Demo, ["--n_layer=2.5"])
    with pytest.raises(ConfigError, match=r"knn\[1\] must be a int"):
        load_config(Demo, ["--knn=[1,'a']"])
    with pytest.raises(ConfigError, match="compile must be True or False"):
        load_config(Demo, ["--compile=maybe"])
    with pytest.raises(ConfigError, match="needs a value"):
        load_config(Demo, ["--n_layer"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Demo, ["config/does_not_exist.py"])


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("train_*.py")) + sorted((ROOT / "config").glob("finetune_*.py")),
                         ids=lambda p: p.name)
def test_shipped_train_configs_are_valid(path):
    cfg = load_settings([str(path)])  # the settings class of the config's task
    assert cfg.max_iters > 0 and type(cfg) is PROGRAMS[cfg.task]


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("sample_*.py")), ids=lambda p: p.name)
def test_shipped_sample_configs_are_valid(path, monkeypatch):
    from knn import KNNSettings
    from sample import SampleConfig
    monkeypatch.chdir(ROOT)
    cfg = load_config(SampleConfig, [str(path)])
    settings = KNNSettings.from_config(cfg)
    if settings.knn:
        settings.check(len(settings.knn))
    for value in (cfg.memory_text or "", cfg.eval_file or "", cfg.start):
        if value.startswith("FILE:") or value.endswith(".jsonl"):
            path = value.removeprefix("FILE:")
            assert path.startswith("data/") or (ROOT / path).is_file(), path  # data/ is made by prepare.py


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("bench_*.py")), ids=lambda p: p.name)
def test_shipped_bench_configs_are_valid(path):
    from bench import TRAINING_ONLY, BenchConfig
    load_config(BenchConfig, [str(path)], ignore=TRAINING_ONLY)


def test_config_file_with_a_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("max_iters = 10\nbatch_size = = 4\n")
    with pytest.raises(ConfigError, match=r"bad.py has a syntax error at line 2"):
        load_config(TrainConfig, [str(bad)])
    boom = tmp_path / "boom.py"
    boom.write_text("max_iters = 1 / 0\n")
    with pytest.raises(ConfigError, match=r"boom.py failed while running \(ZeroDivisionError"):
        load_config(TrainConfig, [str(boom)])
