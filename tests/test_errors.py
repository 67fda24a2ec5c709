"""Bad input on the sampling, chat and data side: every case stops with one clear error (its type, and a
message naming the setting or file and the fix) and loses nothing. Settings out of range, damaged files
of every kind (JSONL, meta.json, conversation states, checkpoints), typos in paths and model names,
failing chat commands and interrupted runs."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import evaluate
import prepare
import sample
import train
from chat import Conversation, DialogBatches, read_dialogs
from checkpoint import CheckpointError, load_model
from common import DataError, atomic_write, read_jsonl
from configurator import ConfigError, load_config
from conftest import ROOT, tiny_dialog_config, tiny_train_config
from knn import KNNMemoryError

BINARY = b"\x80\x81\xfe\xff\x00\x10garbage"


@pytest.fixture(scope="module")
def gpt(char_data, tmp_path_factory):
    """A GPT checkpoint (its weights do not matter here)."""
    out = tmp_path_factory.mktemp("gpt")
    train.main(tiny_train_config(char_data, out, max_iters=2, eval_interval=2))
    return out


@pytest.fixture(scope="module")
def bots(dialog_data, tmp_path_factory):
    """Two chatbots of the same shape, trained from different seeds."""
    outs = []
    for seed in (7, 8):
        out = tmp_path_factory.mktemp(f"bot{seed}")
        train.main(tiny_dialog_config(dialog_data, out, seed=seed, max_iters=2, eval_interval=2))
        outs.append(out)
    return outs


def sample_cfg(out_dir, **kw):
    settings = dict(out_dir=str(out_dir), device="cpu", dtype="float32", num_samples=1, max_new_tokens=4)
    return load_config(sample.SampleConfig, [], **{**settings, **kw})


def eval_cfg(out_dir, **kw):
    return load_config(evaluate.EvalConfig, [], **{"out_dir": str(out_dir), "device": "cpu", **kw})


def run_script(*args, stdin=""):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, input=stdin,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def assert_one_line_error(r, words):
    """A script that stopped with exit status 1 and one 'error: ...' line, no traceback."""
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(words, last), last


# -----------------------------------------------------------------------------
# settings: every one range-checked before any work, with the allowed range in the message

RANGE = "is out of range: {} must be"
SAMPLE_BAD = [  # (setting, value, what the message says after "setting=value")
    ("temperature", -1.0, ">= 0"), ("temperature", math.nan, ">= 0"), ("top_k", 0, ">= 1"),
    ("top_p", 0.0, r"in \(0, 1\] \(or None: off\)"), ("top_p", 1.5, r"in \(0, 1\]"), ("batch_size", 0, ">= 1"),
    ("num_samples", 0, ">= 1"), ("max_new_tokens", 0, ">= 1"), ("eval_seeds", 0, ">= 1"), ("eval_items", 0, ">= 1"),
    ("knnlm_lambda", 1.0, r"in \[0, 1\)"), ("knnlm_lambda", -0.5, r"in \[0, 1\)"), ("knnlm_k", 0, ">= 1"),
    ("knnlm_temperature", 0.0, "> 0"), ("seed", -1, ">= 0"), ("vocab_capacity", 3, ">= 6"), ("knn", [0, -2], ">= 0"),
    ("bookkeeping_frac", 1.5, r"in \[0, 1\]"), ("resid_frac", -0.1, r"in \[0, 1\]"), ("knn_nprobe", 0, ">= 1"),
    ("knn_pq_m", 0, ">= 1"), ("knn_softmax_influence", 0.0, "> 0"),
    ("mode", "chatt", "is not allowed: mode must be 'sample' or 'chat'"),
    ("eval", "ppl", "is not allowed: eval must be None, 'recall' or 'sentiment' \\(.*evaluate.py's\\)"),
    ("device", "gpu", "is not allowed: device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    ("memory_text", "", "is empty: memory_text must be a path or text"), ("output_json", "", "is empty"),
    ("chat_save", "", "is empty"), ("init_from", "", "is empty"), ("start", "", "is empty"),
]


def refusal(name, words):
    """The message that refuses setting `name`: 'name=value' (name[i]=value for an entry of a list), then words
    (a range alone stands for 'is out of range: name must be RANGE')."""
    words = words if words.startswith("is ") else f"{RANGE.format(name)} {words}"
    return rf"^{name}(\[\d+\])?=.*? {words}"


@pytest.mark.parametrize("name, value, words", SAMPLE_BAD, ids=lambda v: repr(v)[:20])
def test_sample_settings_out_of_range(tmp_path, name, value, words):
    with pytest.raises(ConfigError, match=refusal(name, words)):  # when the settings are read
        sample_cfg(tmp_path, **{name: value})
    # and first thing in main(), for settings built in code: out_dir holds no model, nothing is loaded
    with pytest.raises(ConfigError, match=refusal(name, words)):
        sample.main(sample.SampleConfig(**{"out_dir": str(tmp_path / "no_model"), "device": "cpu", name: value}))


EVAL_BAD = [
    ("batch_size", 0, ">= 1"),
    ("eval", "recall", "is not allowed: eval must be 'ppl', 'knnlm', 'dialog' or 'longrange' .*sample.py's"),
    ("eval_memory_sizes", [], "is empty: give the memory sizes to compare"), ("eval_memory_sizes", [1024, 0], ">= 1"),
    ("knnlm_lambdas", [0.5, 1.0], r"in \[0, 1\)"), ("eval_tokens", 1, ">= 2"), ("knnlm_max_tokens", 0, ">= 2"),
    ("knnlm_k", 0, ">= 1"), ("seed", -1, ">= 0"), ("data_dir", "", "is empty"), ("eval_file", "", "is empty"),
    ("knn_nlist", -1, ">= 0"), ("eval_baseline", "", "is empty"), ("longrange_base", "", "is empty"),
    ("longrange_arms", ["knn", "oracle"], "is not allowed: longrange_arms must be 'checkpoints', 'knn' or 'knnlm'"),
]


@pytest.mark.parametrize("name, value, words", EVAL_BAD, ids=lambda v: repr(v)[:20])
def test_eval_settings_out_of_range(tmp_path, name, value, words):
    with pytest.raises(ConfigError, match=refusal(name, words)):
        eval_cfg(tmp_path, **{name: value})
    with pytest.raises(ConfigError, match=refusal(name, words)):
        evaluate.main(evaluate.EvalConfig(**{"out_dir": str(tmp_path / "no_model"), "device": "cpu", name: value}))


@pytest.mark.parametrize("cfg", [sample_cfg, eval_cfg])
def test_memory_choices_are_checked_too(tmp_path, cfg):
    with pytest.raises(KNNMemoryError, match="knn_backend='fais'; choose one of"):
        cfg(tmp_path, knn_backend="fais")


@pytest.mark.parametrize("cfg", [sample_cfg, eval_cfg])
@pytest.mark.parametrize("name", ["eval_out", "out_dir"])
def test_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path, cfg, name):
    file = tmp_path / "f"
    file.write_text("kept")
    folders = {"out_dir": tmp_path / "out", name: file}
    with pytest.raises(ConfigError, match=f"{name}=.* is a file: {name} names a folder"):
        cfg(folders["out_dir"], eval_out=str(folders.get("eval_out", tmp_path / "ev")))
    assert file.read_text() == "kept"


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("sample_*.py")) + sorted((ROOT / "config").glob("eval_*.py")),
                         ids=lambda p: p.name)
def test_shipped_configs_pass_the_checks(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    load_config(sample.SampleConfig if path.name.startswith("sample_") else evaluate.EvalConfig, [str(path)])


@pytest.mark.parametrize("args, words", [
    (["--batch_size=0"], "batch_size=0 is out of range: batch_size must be >= 1"),
    (["--top_k=0"], "top_k=0 is out of range: top_k must be >= 1"),
    (["--top_p=0"], r"top_p=0.0 is out of range: top_p must be in \(0, 1\]"),
    (["--temperature=-1"], "temperature=-1.0 is out of range: temperature must be >= 0"),
    (["--init_from=scrach"], r"init_from must be 'resume', a pretrained name \(gpt2, .*\) or an existing folder/.gguf"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_cli_stops_with_one_line(gpt, args, words):
    assert_one_line_error(run_script("sample.py", f"--out_dir={gpt}", "--device=cpu", *args), words)


def test_evaluate_cli_stops_with_one_line(gpt):
    assert_one_line_error(run_script("evaluate.py", f"--out_dir={gpt}", "--device=cpu", "--init_from=scrach"),
                          "init_from must be 'resume'")


# -----------------------------------------------------------------------------
# model sources: typos and damaged checkpoints

@pytest.mark.parametrize("init_from", ["scrach", "./models/typo", "missing.gguf", "gpt3"])
def test_init_from_typo(tmp_path, init_from):
    message = r"init_from='.*': init_from must be 'resume', a pretrained name \(gpt2, gpt2-medium, \.\.\., smollm2\)"
    with pytest.raises(CheckpointError, match=message):
        load_model(init_from, str(tmp_path), "cpu")
    with pytest.raises(CheckpointError, match=message):
        sample.main(sample_cfg(tmp_path, init_from=init_from))
    with pytest.raises(CheckpointError, match=message):
        evaluate.main(eval_cfg(tmp_path, init_from=init_from))


@pytest.mark.parametrize("damage, words", [
    (lambda c: c["model_args"].update(n_lyr=2), "does not describe a model this code builds.*train it again"),
    (lambda c: c["model"].pop(next(iter(c["model"]))), "does not describe a model this code builds"),
    (lambda c: c.pop("meta"), "no tokenizer description"),
    (lambda c: c["meta"].pop("chars"), "tokenizer description lacks 'chars'"),
])
def test_damaged_checkpoint(gpt, tmp_path, damage, words):
    ckpt = torch.load(gpt / "ckpt.pt", weights_only=True)
    damage(ckpt)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=rf"ckpt.pt.*{words}"):
        load_model("resume", str(tmp_path), "cpu")


# -----------------------------------------------------------------------------
# JSONL files: one reader, the file and the line named

ITEM = {"memory": "Ada lives in Oslo.", "prompt": "Q: Where does Ada live?\nA:", "answers": ["Oslo"]}
RECALL_DAMAGED = {
    "empty": (b"", "holds no recall items"),
    "blank lines": (b"\n  \n", "holds no recall items"),
    "truncated": ((json.dumps(ITEM) + "\n" + json.dumps(ITEM)[:25]).encode(), r"line 2: not valid JSON.*cut short"),
    "not JSON": (b"memory: Ada\n", "line 1: not valid JSON"),
    "a list": (b"[1, 2]\n", "line 1: a JSON list, not an object"),
    "no answers": (json.dumps({"memory": "m", "prompt": "p"}).encode(), 'line 1: no "answers"'),
    "no prompt": (json.dumps({"memory": "m", "answers": ["a"]}).encode(), 'line 1: no "prompt"'),
    "no memory": (json.dumps({"prompt": "p", "answers": ["a"]}).encode(), 'line 1: no "memory"'),
    "answers a string": (json.dumps({**ITEM, "answers": "Oslo"}).encode(), '"answers" is "Oslo", not a list'),
    "answers empty": (json.dumps({**ITEM, "answers": []}).encode(), "not a non-empty list of strings"),
    "prompt a number": (json.dumps({**ITEM, "prompt": 3}).encode(), '"prompt" is 3, not a string'),
    "binary": (BINARY, "not UTF-8 text"),
}


def damaged_file(path, damaged: dict, case: str):
    """Write damaged[case]'s bytes to path; returns the words its error must say."""
    data, words = damaged[case]
    path.write_bytes(data)
    return words


@pytest.mark.parametrize("case", RECALL_DAMAGED)
def test_damaged_recall_file(gpt, tmp_path, case):
    path = tmp_path / "recall.jsonl"
    words = damaged_file(path, RECALL_DAMAGED, case)
    cfg = sample_cfg(gpt, knn=[0, 3], eval="recall", eval_file=str(path), eval_seeds=1, eval_out=str(tmp_path / "ev"))
    with pytest.raises(DataError, match=rf"recall.jsonl.*{words}.*prepare.py facts"):
        sample.main(cfg)
    assert not (tmp_path / "ev").exists()


def test_missing_recall_file(gpt, tmp_path):
    cfg = sample_cfg(gpt, knn=[0, 3], eval="recall", eval_file=str(tmp_path / "typo.jsonl"), eval_seeds=1)
    with pytest.raises(DataError, match=r"no recall items file .*typo.jsonl; a recall file is made by python prepare.py"):
        sample.main(cfg)


def test_read_jsonl_names_the_line_after_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"b": 3}\n')
    with pytest.raises(DataError, match=r"x.jsonl line 4: no \"a\"; each line must be one JSON object with a; fix it"):
        read_jsonl(path, ("a",), "things", "fix it")
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(path, {"a": int}) == [{"a": 1}, {"a": 2}]


TURN = {"user": "i am zoe .", "bot": "nice to meet you , zoe .", "kind": "fact", "attribute": "name", "answer": "zoe"}
QUESTION = {"user": "who am i ?", "bot": "your name is zoe .", "kind": "question", "attribute": "name", "answer": "zoe",
            "fact_turn": 0, "repeat": False}
DIALOG = {"turns": [TURN, QUESTION], "entities": ["zoe"]}
DIALOGS_DAMAGED = {
    "empty": (b"", "holds no dialogues"),
    "truncated": ((json.dumps(DIALOG) + "\n" + json.dumps(DIALOG)[:30]).encode(), "line 2: not valid JSON"),
    "not JSON": (b"{turns: []}\n", "line 1: not valid JSON"),
    "no entities": (json.dumps({"turns": [TURN]}).encode(), 'line 1: no "entities"'),
    "turns a string": (json.dumps({**DIALOG, "turns": "hi"}).encode(), '"turns" is "hi", not a list'),
    "turns empty": (json.dumps({**DIALOG, "turns": []}).encode(), '"turns" is empty'),
    "turn not an object": (json.dumps({**DIALOG, "turns": ["hi"]}).encode(), "turn 0: not an object"),
    "turn without bot": (json.dumps({**DIALOG, "turns": [{"user": "hi", "kind": "chat"}]}).encode(), 'turn 0: no "bot"'),
    "question without answer": (json.dumps({**DIALOG, "turns": [TURN, {**QUESTION, "answer": None}]}).encode(),
                                '"answer" is null, not a string'),
    "binary": (BINARY, "not UTF-8 text"),
}


@pytest.mark.parametrize("case", DIALOGS_DAMAGED)
def test_damaged_dialogue_file(tmp_path, dialog_data, case):
    path = tmp_path / "dialogs_test.jsonl"
    words = damaged_file(path, DIALOGS_DAMAGED, case)
    with pytest.raises(DataError, match=rf"dialogs_test.jsonl.*{words}.*prepare.py dialogs"):
        read_dialogs(str(path))
    # training reads its dialogues through the same checks
    folder = tmp_path / "dialogs"
    folder.mkdir()
    (folder / "dialogs_train.jsonl").write_text((dialog_data / "dialogs" / "dialogs_train.jsonl").read_text())
    damaged_file(folder / "dialogs_val.jsonl", DIALOGS_DAMAGED, case)
    with pytest.raises(DataError, match=rf"dialogs_val.jsonl.*{words}.*task='dialog' reads dialogues; run: python prepare.py dialogs"):
        DialogBatches(str(folder), 0, 8, 16)


def test_damaged_dialogue_file_in_evaluate(bots, tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(DIALOG) + "\n{")
    with pytest.raises(DataError, match=r"test.jsonl line 2: not valid JSON"):
        evaluate.main(eval_cfg(bots[0], eval="dialog", eval_file=str(path), eval_out=str(tmp_path / "ev")))
    with pytest.raises(DataError, match=r"no dialogues file .*missing.jsonl; run python prepare.py dialogs, or set eval_file"):
        evaluate.main(eval_cfg(bots[0], eval="dialog", eval_file=str(tmp_path / "missing.jsonl")))


def test_damaged_dialogue_turns_for_prepare(tmp_path):
    path = tmp_path / "turns.jsonl"
    path.write_text('{"dialog": 1, "user": "hi", "bot": "hello"}\n{"dialog": 1, "user": "h')
    with pytest.raises(DataError, match=r"turns.jsonl line 2: not valid JSON.*\{\"dialog\": ID, \"user\": TEXT"):
        prepare.prepare("dialogs", input=str(path), out_dir=str(tmp_path / "out"))
    path.write_text('{"dialog": [1], "user": "hi", "bot": "hello"}\n')
    with pytest.raises(DataError, match=r"line 1: \"dialog\" is \[1\], not a string or an integer"):
        prepare.prepare("dialogs", input=str(path), out_dir=str(tmp_path / "out"))


# -----------------------------------------------------------------------------
# meta.json

@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    (folder / "input.txt").write_text("the cat sat on the mat.\n" * 200)
    prepare.prepare("text", input=folder / "input.txt", tokenizer="char", out_dir=folder / "text")
    return folder / "text"


META_DAMAGED = {
    "not JSON": ("{oops", "is damaged \\(not JSON"),
    "truncated": (None, "is damaged \\(not JSON"),
    "a list": ("[1, 2]", "is damaged \\(a JSON list, not an object\\)"),
    "binary": (BINARY, "is damaged \\(not JSON"),
    "no vocab_size": ({"vocab_size": ...}, 'is damaged: no "vocab_size"'),
    "vocab_size a string": ({"vocab_size": "65"}, 'is damaged: "vocab_size" is "65", not an integer'),
    "dtype unknown": ({"dtype": "int7"}, "is damaged: \"dtype\" is 'int7', not uint16 or uint32"),
    "no chars": ({"chars": ...}, 'is damaged: no "chars"'),
    "chars a string": ({"chars": "abc"}, 'is damaged: "chars" is "abc", not a list'),
    "negative count": ({"val_tokens": -1}, "is damaged: a negative vocab_size or token count"),
}


@pytest.mark.parametrize("case", META_DAMAGED)
def test_damaged_meta_json(text_dataset, tmp_path, case):
    import shutil
    folder = tmp_path / "text"
    shutil.copytree(text_dataset, folder)
    change, words = META_DAMAGED[case]
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    if change is None:
        meta_path.write_text(meta_path.read_text()[:40])
    elif isinstance(change, dict):
        meta = {k: v for k, v in {**meta, **change}.items() if v is not ...}
        meta_path.write_text(json.dumps(meta))
    elif isinstance(change, bytes):
        meta_path.write_bytes(change)
    else:
        meta_path.write_text(change)
    with pytest.raises(DataError, match=rf"meta.json {words}.*re-run: python prepare.py text --out_dir"):
        prepare.load_meta(folder)


# -----------------------------------------------------------------------------
# conversation states

def new_conversation(bot, **kw):
    model, vocab, _, source = load_model("resume", str(bot), "cpu")
    return Conversation(model, vocab, source=source, **kw)


def snapshot(conv):
    return (conv.vocab.to_dict(), {k: v.clone() for k, v in conv.state.items()},
            conv.model.transformer.wte.weight.detach().clone(), conv.step)


def assert_unchanged(conv, before):
    vocab, state, wte, step = before
    assert conv.vocab.to_dict() == vocab and conv.step == step
    assert all(torch.equal(conv.state[k], v) for k, v in state.items())
    assert torch.equal(conv.model.transformer.wte.weight, wte)


@pytest.fixture(scope="module")
def saved(bots, tmp_path_factory):
    """A conversation of bots[0] that learnt a new word, saved."""
    path = tmp_path_factory.mktemp("conv") / "good"
    conv = new_conversation(bots[0])
    conv.turn(["my name is quirinus ."])
    conv.save(str(path))
    return path


def damage_json(change):
    def apply(path):
        meta = json.loads(open(f"{path}.json").read())
        meta = {k: v for k, v in {**meta, **change}.items() if v is not ...}
        open(f"{path}.json", "w").write(json.dumps(meta))
    return apply


def write_file(suffix, data):
    return lambda path: open(f"{path}{suffix}", "wb").write(data)


CONV_DAMAGED = {
    "json not JSON": (write_file(".json", b"{oops"), DataError, r"is damaged \(JSONDecodeError"),
    "json truncated": (lambda p: open(f"{p}.json", "w").write(open(f"{p}.json").read()[:60]), DataError,
                       r"is damaged \(JSONDecodeError"),
    "json binary": (write_file(".json", BINARY), DataError, r"is damaged \(UnicodeDecodeError"),
    "json a list": (write_file(".json", b"[]"), DataError, "not a conversation state this code reads"),
    "format 99": (damage_json({"format_version": 99}), DataError, "format_version 99, expected 1 or 2"),
    "step a string": (damage_json({"step": "x"}), DataError, 'is damaged: "step" is "x", not an integer'),
    "no batch_size": (damage_json({"batch_size": ...}), DataError, 'is damaged: no "batch_size"'),
    "batch_size 0": (damage_json({"batch_size": 0}), DataError, "batch_size < 1"),
    "no fingerprint": (damage_json({"model_fingerprint": ...}), DataError, 'no "model_fingerprint"'),
    "trained_words a number": (damage_json({"trained_words": 5}), DataError, '"trained_words" is 5, not a list'),
    "vocab words a number": (damage_json({"vocab": {"words": 3}}), DataError,
                             'the word vocabulary is damaged: "words" is 3, not a list'),
    "vocab counts short": (damage_json({"vocab": {"words": ["<pad>"], "counts": [1, 2]}}), DataError,
                           '"counts" is not a list of integers, one per word'),
    "safetensors garbage": (write_file(".safetensors", BINARY * 10), DataError, r"is damaged \(Safetensor"),
    "safetensors empty": (write_file(".safetensors", b""), DataError, "is damaged"),
    "no json": (lambda p: os.remove(f"{p}.json"), DataError, r"no conversation state .*\.json: save one first"),
    "other batch size": (damage_json({"batch_size": 3}), ConfigError, "does not fit this model: memory state"),
}


@pytest.mark.parametrize("case", CONV_DAMAGED)
def test_damaged_conversation_state_is_refused_and_nothing_changes(bots, saved, tmp_path, case):
    damage, error, words = CONV_DAMAGED[case]
    path = tmp_path / "c"
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"c{suffix}").write_bytes(open(f"{saved}{suffix}", "rb").read())
    damage(path)
    conv = new_conversation(bots[0])
    conv.turn(["i live in oslo ."])
    before = snapshot(conv)
    with pytest.raises(error, match=words) as e:
        conv.load(str(path))
    assert str(path) in str(e.value)
    assert_unchanged(conv, before)
    conv.turn(["where do i live ?"])  # and the conversation goes on


def test_conversation_of_another_model_is_refused(bots, saved):
    other = new_conversation(bots[1])
    before = snapshot(other)
    with pytest.raises(ConfigError, match=rf"belongs to another model: it was saved with .*{bots[0].name}.*ckpt.pt "
                                          rf"\(fingerprint [0-9a-f]+\), this is .*{bots[1].name}.*ckpt.pt \(fingerprint "
                                          "[0-9a-f]+\\); load it with the model it was saved with"):
        other.load(str(saved))
    assert_unchanged(other, before)
    same = new_conversation(bots[0])
    same.load(str(saved))  # the model it belongs to (its fingerprint before the conversation grew words)
    assert "quirinus" in same.vocab


def test_conversation_saved_before_fingerprints_loads_with_a_warning(bots, saved, tmp_path, capsys):
    path = tmp_path / "old"
    (tmp_path / "old.safetensors").write_bytes(open(f"{saved}.safetensors", "rb").read())
    meta = json.loads(open(f"{saved}.json").read())
    meta = {k: v for k, v in meta.items() if k not in ("model_fingerprint", "model")} | {"format_version": 1}
    (tmp_path / "old.json").write_text(json.dumps(meta))
    conv = new_conversation(bots[0])
    conv.load(str(path))
    assert "quirinus" in conv.vocab and "cannot be checked" in capsys.readouterr().out


def test_long_utterance_warns_how_many_words_were_dropped(bots, capsys):
    conv = new_conversation(bots[0])
    conv.turn(["word " * 20000])
    assert ("warning: an utterance of 20,000 words is longer than block_size 16: its first 19,984 words were dropped"
            in capsys.readouterr().out)


# -----------------------------------------------------------------------------
# the chat: no failing command ends it, and it is always saved

def chat_cfg(bot, tmp_path, **kw):
    return sample_cfg(bot, mode="chat", chat_save=str(tmp_path / "end"), output_json=str(tmp_path / "t.json"), **kw)


def test_chat_survives_failing_commands_and_saves(bots, saved, tmp_path, capsys, monkeypatch):
    damaged = tmp_path / "damaged"
    (tmp_path / "damaged.safetensors").write_bytes(BINARY)
    (tmp_path / "damaged.json").write_text("{}")
    (tmp_path / "a_file").write_text("")
    script = tmp_path / "script.txt"
    script.write_text("\n".join([
        "hi , i am zoltan .", f"/load {tmp_path / 'typo'}", "i live in oslo .", f"/load {damaged}",
        f"/load {saved}", f"/save {tmp_path / 'a_file' / 'sub'}", "/reset", "who am i ?", "/frobnicate"]) + "\n")
    import chat
    reset = chat.Conversation.reset  # /reset fails with an unexpected error
    monkeypatch.setattr(chat.Conversation, "reset", lambda self, batch_size=None: reset(self, batch_size)
                        if batch_size else 1 / 0)
    transcript = sample.main(chat_cfg(bots[1], tmp_path, chat_script=str(script)))
    out = capsys.readouterr().out
    assert [t["user"] for t in transcript] == ["hi , i am zoltan .", "i live in oslo .", "who am i ?"]
    assert f"error: no conversation state {tmp_path / 'typo'}.safetensors" in out
    assert re.search(r"error: conversation state .*damaged is damaged", out)
    assert "error: conversation " in out and "belongs to another model" in out  # saved is bots[0]'s
    assert "error: ZeroDivisionError" in out and out.count("(the conversation goes on)") == 5
    assert f"saved conversation {tmp_path / 'end'}" in out
    conv = new_conversation(bots[1])
    conv.load(str(tmp_path / "end"))
    assert "zoltan" in conv.vocab and conv.step == 3
    assert json.load(open(tmp_path / "t.json"))["transcript"] == transcript


def test_ctrl_c_mid_chat_still_saves(bots, tmp_path, monkeypatch):
    lines = iter(["my name is quirinus .", "i live in oslo ."])

    def keyboard(prompt):
        line = next(lines, None)
        if line is None:
            raise KeyboardInterrupt
        return line
    monkeypatch.setattr("builtins.input", keyboard)
    with pytest.raises(KeyboardInterrupt):
        sample.main(chat_cfg(bots[0], tmp_path))
    conv = new_conversation(bots[0])
    conv.load(str(tmp_path / "end"))
    assert "quirinus" in conv.vocab and conv.step == 2
    assert [t["user"] for t in json.load(open(tmp_path / "t.json"))["transcript"]] == ["my name is quirinus .",
                                                                                       "i live in oslo ."]


def test_chat_cli_with_a_typo_in_load_saves(bots, tmp_path):
    r = run_script("sample.py", f"--out_dir={bots[0]}", "--device=cpu", "--mode=chat", f"--chat_save={tmp_path / 'c'}",
                   stdin=f"hi , i am Zoltan .\n/load {tmp_path / 'typo'}\nwho am i ?\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "error: no conversation state" in r.stdout and (tmp_path / "c.safetensors").exists()
    conv = new_conversation(bots[0])
    conv.load(str(tmp_path / "c"))
    assert "zoltan" in conv.vocab and conv.step == 2


def test_chat_load_at_start_that_fails_stops_before_anything_is_written(bots, tmp_path):
    cfg = chat_cfg(bots[0], tmp_path, chat_load=str(tmp_path / "typo"), chat_script=str(tmp_path / "none.txt"))
    with pytest.raises(DataError, match="no conversation state"):
        sample.main(cfg)
    assert not (tmp_path / "end.json").exists()


# -----------------------------------------------------------------------------
# memory text

@pytest.mark.parametrize("value, error, words", [
    ("", ConfigError, "memory_text='' is empty: memory_text must be a path or text"),
    ("FILE:{tmp}/binary.bin", ConfigError, r"binary.bin .* is not UTF-8 text \(binary\?.*give a text file after FILE:"),
    ("FILE:{tmp}/typo.txt", ConfigError, "typo.txt not found .*give an existing text file after FILE:"),
    ("FILE:{tmp}", ConfigError, "is a folder, not a text file"),
])
def test_bad_memory_text(gpt, tmp_path, value, error, words):
    (tmp_path / "binary.bin").write_bytes(BINARY)
    with pytest.raises(error, match=words):
        sample.main(sample_cfg(gpt, knn=[0, 3], memory_text=value.format(tmp=tmp_path)))


# -----------------------------------------------------------------------------
# writes: temp files never outlive a failed or killed run

@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_atomic_write_removes_its_temp_file_when_write_fails(tmp_path, exc):
    path = tmp_path / "result.json"
    path.write_text("old")

    def write(f):
        f.write(b"half a resu")
        raise exc
    with pytest.raises(type(exc)):
        atomic_write(path, write)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_prepare_removes_the_temp_files_of_a_killed_run(tmp_path, capsys):
    text = tmp_path / "input.txt"
    text.write_text("hello world.\n" * 300)
    out = tmp_path / "out"
    out.mkdir()
    pid = dead_pid()
    stale = [out / f"train.bin.{pid}.tmp", out / f"meta.json.{pid}.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 150_000)
    running = out / f"val.bin.{os.getppid()}.tmp"  # a live process's: left alone
    running.write_bytes(b"x")
    prepare.prepare("text", input=text, tokenizer="char", out_dir=out)
    assert not any(p.exists() for p in stale) and running.exists()
    assert f"note: removed 0.3 MB of temp files that a killed run left in {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tmp") == [running.name]
    assert prepare.load_meta(out)["tokenizer"] == "char"
