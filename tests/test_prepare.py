import json
import random
import re
import urllib.error

import numpy as np
import pytest

import prepare
from prepare import DataError


def read_split(data_dir, split):
    meta = prepare.load_meta(data_dir)
    return prepare.get_tokenizer(meta).decode(prepare.open_split(data_dir, split, meta))


@pytest.fixture
def text_file(tmp_path):
    text = "First line of a small corpus.\nSecond line, with ünïcödé — and digits 0123.\n\nA last paragraph.\n"
    path = tmp_path / "small.txt"
    path.write_text(text, encoding="utf-8")
    return path, text


@pytest.fixture(scope="module")
def facts_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("facts")
    prepare.prepare("facts", out_dir=out_dir)
    return out_dir


# -----------------------------------------------------------------------------
# tokenizers and format

def test_char_round_trip_via_cli(text_file, tmp_path, capsys):
    path, text = text_file
    out_dir = tmp_path / "out"
    prepare.main(["text", "--input", str(path), "--tokenizer", "char", "--out_dir", str(out_dir)])
    assert "train" in capsys.readouterr().out
    meta = prepare.load_meta(out_dir)
    assert meta["chars"] == sorted(set(text))
    assert meta["vocab_size"] == len(set(text))
    assert meta["eot_token"] is None
    assert meta["dtype"] == "uint16"
    assert meta["source"] == str(path)
    assert read_split(out_dir, "train") + read_split(out_dir, "val") == text
    assert meta["train_tokens"] == int(len(text) * 0.9)


@pytest.mark.needs_data("gpt2/tiktoken_cache")
def test_gpt2_tokenizer():
    tok = prepare.get_tokenizer({"tokenizer": "gpt2"})
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert (tok.name, tok.vocab_size, tok.eot_token) == ("gpt2", 50257, 50256)
    assert tok.encode("<|endoftext|>") == [50256]


def test_unknown_char_is_refused():
    tok = prepare.get_tokenizer({"tokenizer": "char", "chars": list("\nabc")})
    assert tok.decode(tok.encode("cab\n")) == "cab\n"
    with pytest.raises(DataError, match="'z'.*not in the model's char tokenizer"):
        tok.encode("abz")


def test_token_dtype():
    assert prepare.token_dtype(65) == np.uint16
    assert prepare.token_dtype(50257) == np.uint16
    assert prepare.token_dtype(2**16) == np.uint16  # ids 0..65535
    assert prepare.token_dtype(2**16 + 1) == np.uint32
    assert prepare.token_dtype(100277) == np.uint32


def test_char_vocab_over_uint16_writes_uint32(tmp_path):
    # 70,000 distinct characters, skipping the surrogates (not encodable in UTF-8)
    text = "".join(chr(c) for c in range(0x100, 0x100 + 72048) if not 0xD800 <= c < 0xE000)
    path = tmp_path / "wide.txt"
    path.write_text(text, encoding="utf-8")
    meta = prepare.prepare("text", input=path, tokenizer="char", out_dir=tmp_path / "out")
    assert meta["vocab_size"] == 70001  # with the newline that separates documents
    assert meta["dtype"] == "uint32"
    assert prepare.open_split(tmp_path / "out", "val", meta).max() > 65535
    assert read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "val") == text


def test_check_meta_compatible():
    char_a = {"tokenizer": "char", "vocab_size": 3, "chars": list("\nab")}
    char_b = {"tokenizer": "char", "vocab_size": 3, "chars": list("\nac")}
    gpt2 = {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256}
    prepare.check_meta_compatible(char_a, dict(char_a))
    prepare.check_meta_compatible({"tokenizer": "gpt2"}, gpt2)
    with pytest.raises(DataError, match="tokenizer mismatch"):
        prepare.check_meta_compatible(char_a, gpt2)
    with pytest.raises(DataError, match="char tables differ in 'bc'"):
        prepare.check_meta_compatible(char_a, char_b)


# -----------------------------------------------------------------------------
# datasets

@pytest.mark.needs_data("shakespeare/input.txt")
def test_shakespeare_char(shared_data, tmp_path):
    path = shared_data / "shakespeare" / "input.txt"
    text = path.read_text(encoding="utf-8")
    meta = prepare.prepare("shakespeare_char", input=path, out_dir=tmp_path)
    assert meta == prepare.load_meta(tmp_path)
    assert meta["format_version"] == 1
    assert (meta["name"], meta["tokenizer"], meta["dtype"]) == ("shakespeare_char", "char", "uint16")
    assert meta["eot_token"] is None and meta["source"] == str(path)
    assert meta["vocab_size"] == len(meta["chars"]) == 65
    assert meta["train_tokens"] + meta["val_tokens"] == len(text)
    assert meta["train_tokens"] == int(len(text) * 0.9)
    train = prepare.open_split(tmp_path, "train", meta)
    assert prepare.get_tokenizer(meta).decode(train[:14]) == "First Citizen:"
    with pytest.raises(ValueError):  # read-only
        train[0] = 1


@pytest.mark.needs_data("shakespeare/input.txt", "gpt2/tiktoken_cache")
def test_shakespeare_gpt2_in_chunks(shared_data, tmp_path, monkeypatch):
    # small chunks and batches, so the text goes through many of both
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 4096)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 100_000)
    path = shared_data / "shakespeare" / "input.txt"
    text = path.read_text(encoding="utf-8")
    assert len(list(prepare.text_chunks(text))) > 200
    assert "".join(prepare.text_chunks(text)) == text
    meta = prepare.prepare("shakespeare", input=path, out_dir=tmp_path)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    assert "chars" not in meta
    tok = prepare.get_tokenizer(meta)
    cut = int(len(text) * 0.9)
    # chunked encoding gives exactly the tokens of encoding each split whole
    assert prepare.open_split(tmp_path, "train", meta).tolist() == tok.encode(text[:cut])
    assert prepare.open_split(tmp_path, "val", meta).tolist() == tok.encode(text[cut:])


@pytest.mark.needs_data("gpt2/tiktoken_cache")
def test_documents_separated_by_eot(tmp_path):
    stories = ["Once upon a time there was a cat.", "The dog ran.\nIt was happy.", "A bird sang a song."]
    path = tmp_path / "stories.txt"
    path.write_text("\n\n".join(stories) + "\n", encoding="utf-8")
    meta = prepare.prepare("tinystories", input=path, out_dir=tmp_path / "out", val_frac=0.34)
    tok = prepare.get_tokenizer(meta)
    train = prepare.open_split(tmp_path / "out", "train", meta).tolist()
    assert train == tok.encode(stories[0]) + [50256] + tok.encode(stories[1])
    assert prepare.open_split(tmp_path / "out", "val", meta).tolist() == tok.encode(stories[2])


def test_char_documents_separated_by_blank_line(tmp_path):
    (tmp_path / "docs").mkdir()
    for i, doc in enumerate(["alpha", "beta", "gamma\ndelta", "epsilon"]):
        (tmp_path / "docs" / f"{i}.txt").write_text(doc + "\n", encoding="utf-8")
    prepare.prepare("openwebtext", input=tmp_path / "docs", tokenizer="char", out_dir=tmp_path / "out", val_frac=0.25)
    assert read_split(tmp_path / "out", "train") == "alpha\n\n\nbeta\n\n\ngamma\ndelta\n"
    assert read_split(tmp_path / "out", "val") == "epsilon\n"


@pytest.mark.needs_data("gpt2/tiktoken_cache")
def test_tinystories_from_hub(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    hub = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["One day, Tom ran.", "Sue sang."]}),
                               validation=datasets.Dataset.from_dict({"text": ["The end."]}))
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kwargs: hub)
    meta = prepare.prepare("tinystories", out_dir=tmp_path)
    tok = prepare.get_tokenizer(meta)
    train = prepare.open_split(tmp_path, "train", meta).tolist()
    assert train == tok.encode("One day, Tom ran.") + [50256] + tok.encode("Sue sang.")
    assert prepare.open_split(tmp_path, "val", meta).tolist() == tok.encode("The end.")
    assert meta["source"] == "https://huggingface.co/datasets/roneneldan/TinyStories"


def test_offline_shakespeare_is_one_line_error(tmp_path, monkeypatch):
    def no_network(url):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(prepare, "fetch", no_network)
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["shakespeare_char", "--out_dir", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert message.startswith("error: could not download Tiny Shakespeare")
    assert "--input path/to/input.txt" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_offline_hub_is_one_line_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def no_network(path, **kwargs):
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub\n(LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["tinystories", "--out_dir", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert message.startswith("error: could not load TinyStories from Hugging Face (Couldn't reach")
    assert "--input" in message and "\n" not in message


def test_text_needs_input(tmp_path):
    with pytest.raises(DataError, match="--input"):
        prepare.prepare("text", out_dir=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        prepare.prepare("text", input=tmp_path / "missing.txt", out_dir=tmp_path)


# -----------------------------------------------------------------------------
# load_meta and atomic writes

def test_load_meta_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"meta.json missing.*run: python prepare.py shakespeare_char --out_dir"):
        prepare.load_meta(tmp_path / "shakespeare_char")
    with pytest.raises(DataError, match=r"run: python prepare.py NAME --out_dir"):
        prepare.load_meta(tmp_path / "my_corpus")


def test_load_meta_truncated_and_unknown_version(text_file, tmp_path):
    path, _ = text_file
    out_dir = tmp_path / "text"
    prepare.prepare("text", input=path, tokenizer="char", out_dir=out_dir)
    data = (out_dir / "train.bin").read_bytes()
    (out_dir / "train.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"train.bin has .* bytes .*truncated or mismatched.*re-run: python prepare.py"):
        prepare.load_meta(out_dir)
    (out_dir / "train.bin").write_bytes(data)
    prepare.load_meta(out_dir)
    meta = json.loads((out_dir / "meta.json").read_text())
    (out_dir / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(DataError, match="format_version 2"):
        prepare.load_meta(out_dir)


@pytest.mark.needs_data("gpt2/tiktoken_cache")
def test_failed_run_keeps_old_files(text_file, tmp_path, monkeypatch):
    path, _ = text_file
    out_dir = tmp_path / "out"
    prepare.prepare("text", input=path, tokenizer="char", out_dir=out_dir)
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}

    def crash_midway(self, tok, desc):
        yield True, [0, 1, 2]
        raise RuntimeError("killed")
    monkeypatch.setattr(prepare.TextDocs, "pieces", crash_midway)
    with pytest.raises(RuntimeError, match="killed"):
        prepare.prepare("text", input=path, tokenizer="gpt2", out_dir=out_dir)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
    assert prepare.load_meta(out_dir)["tokenizer"] == "char"


# -----------------------------------------------------------------------------
# facts

def test_facts_documents_answer_from_their_facts():
    names = ["Ada Quill", "Ben Stone", "Cara Marsh", "Dan Hale"]
    for doc in prepare.facts_documents(50, names, random.Random(0)):
        facts, *qa_lines = doc.split("\n")
        sentences = facts.split(". ")
        assert "" not in qa_lines  # no blank line: that separates documents
        # as many questions as asked for, fewer only when fewer facts were stated
        assert min(prepare.FACTS_QAS[0], len(sentences)) <= len(qa_lines) // 2 <= prepare.FACTS_QAS[1]
        for question, answer in zip(qa_lines[0::2], qa_lines[1::2]):
            assert question.startswith("Q: ") and answer.startswith("A: ")
            (name,) = [n for n in names if n in question]
            assert any(name in s and answer[3:] in s for s in sentences), (question, answer, facts)


def test_facts_deterministic(facts_dir, tmp_path):
    again = tmp_path / "again"
    prepare.prepare("facts", out_dir=again)
    for name in ("train.bin", "val.bin", "meta.json", "recall.jsonl"):
        assert (again / name).read_bytes() == (facts_dir / name).read_bytes(), name
    other = tmp_path / "other"
    prepare.prepare("facts", out_dir=other, seed=7)
    assert (other / "train.bin").read_bytes() != (facts_dir / "train.bin").read_bytes()


def test_facts_heldout_names(facts_dir):
    meta = prepare.load_meta(facts_dir)
    assert (meta["tokenizer"], meta["source"], meta["eot_token"]) == ("char", "built-in", None)
    assert meta["train_tokens"] < 10_000_000  # small enough for a tiny model on a CPU
    train, val = read_split(facts_dir, "train"), read_split(facts_dir, "val")
    assert len(train.split("\n\n")) == 0.9 * prepare.FACTS_DOCS and len(val.split("\n\n")) == 0.1 * prepare.FACTS_DOCS
    for name in prepare.FACTS_HELDOUT_NAMES:
        assert name not in train
    assert all(name in val for name in prepare.FACTS_HELDOUT_NAMES)
    # val asks about held-out people only
    asked = re.findall(r"^Q: (?:Where does|What kind of pet does|What is the name of|What is|How old is|What does) (\w+)",
                       val, flags=re.M)
    assert len(asked) > 800 and set(asked) <= set(prepare.FACTS_HELDOUT_NAMES)
    # training people have many invented names, so no answer can be learnt by heart
    asked_train = re.findall(r"^Q: \D+? ([A-Z]\w+ [A-Z]\w+)(?:'s|\?| have| live| do)", train, flags=re.M)
    assert len(set(asked_train)) > 5000


def test_facts_recall_items(facts_dir):
    items = [json.loads(line) for line in (facts_dir / "recall.jsonl").read_text().splitlines()]
    tune = [json.loads(line) for line in (facts_dir / "recall_tune.jsonl").read_text().splitlines()]
    assert len(items) == len(tune) == 200
    assert not {item["memory"] for item in items} & {item["memory"] for item in tune}  # tuning never sees a test item
    assert {item["attribute"] for item in items} == set(prepare.FACTS_QUESTIONS)
    for item in items + tune:
        assert item["entity"].split()[0] in prepare.FACTS_HELDOUT_NAMES
        assert item["entity"] in item["memory"] and item["entity"] in item["prompt"]
        assert item["prompt"].startswith("Q: ") and item["prompt"].endswith("?\nA:")
        assert item["answers"][0] in item["memory"]
