"""
Prepare a dataset for training: tokenize it into OUT/train.bin and OUT/val.bin (flat token ids)
plus OUT/meta.json, which says how to read them back (tokenizer, dtype, token counts).

    python prepare.py shakespeare_char                    # downloads Tiny Shakespeare
    python prepare.py shakespeare_char --input input.txt  # same, from a local copy
    python prepare.py text --input books/ --tokenizer char
    python prepare.py shakespeare --tokenizer smollm2     # a pretrained model's own tokenizer (SmolLM2's)
    python prepare.py facts                               # built-in synthetic QA corpus
    python prepare.py dialogs                             # built-in dialogues for the seq2seq chatbot

train.py and sample.py use load_meta, open_split and get_tokenizer from here, so the
on-disk format is defined in one place.
"""
import argparse
import json
import math
import os
import random
import re
import sys
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import DataError, atomic_write, check_fields, cli, read_jsonl, remove_stale_temps
from common import first_line as _first_line

FORMAT_VERSION = 1
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSTORIES_HF = "roneneldan/TinyStories"
OPENWEBTEXT_HF = "Skylion007/openwebtext"  # the canonical name of the hub's "openwebtext"
NUM_PROC = max(1, (os.cpu_count() or 1) // 2)  # processes for Hugging Face download and tokenization
CHUNK_CHARS = 1 << 18  # long texts are cut into pieces of about this size, so tokenization can be spread over threads
BATCH_CHARS = 1 << 24  # text tokenized per batch: bounds memory however big the corpus is


# -----------------------------------------------------------------------------
# tokenizers

class CharTokenizer:
    name = "char"
    eot_token = None

    def __init__(self, chars):
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        # char-level data has no EOT token: documents are separated by a blank line instead
        self.separator = self.encode("\n\n")

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise DataError(f"character {e.args[0]!r} is not in the model's char tokenizer "
                            f"({self.vocab_size} chars, taken from its training data)") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


class GPT2Tokenizer:
    name = "gpt2"

    def __init__(self):
        import tiktoken
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches its BPE files on first use; any failure there means "no files"
            raise DataError(f"could not load the GPT-2 BPE files ({_first_line(e)}); offline, set "
                            "TIKTOKEN_CACHE_DIR to their folder (e.g. ../shared/data/gpt2/tiktoken_cache)") from None
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token
        self.separator = [self.eot_token]

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def encode_batch(self, texts):
        # corpora are encoded as ordinary text: a literal "<|endoftext|>" in the data must not end a document
        return self.enc.encode_ordinary_batch(texts)


class HFTokenizer:
    """A pretrained model's own tokenizer, through transformers: `model_name` is any name
    GPT.from_pretrained takes ('smollm2', a .gguf file, a Hugging Face folder or hub name)."""
    name = "hf"

    def __init__(self, model_name):
        try:
            from model import pretrained_tokenizer  # resolves short names, caches what a GGUF file holds
            self.hf = pretrained_tokenizer(model_name)
        except (OSError, ValueError) as e:
            raise DataError(f"could not load the tokenizer of {model_name!r} ({_first_line(e)}); use char, "
                            "gpt2, word, smollm2, a .gguf file or a Hugging Face model folder") from None
        self.model_name = model_name
        self.hf.model_max_length = sys.maxsize  # corpora are encoded in long chunks: no "too long" warnings
        self.vocab_size = len(self.hf)
        self.eot_token = self.hf.eos_token_id
        self.separator = [self.eot_token] if self.eot_token is not None else self.encode("\n\n")

    def encode(self, text):
        # like GPT2Tokenizer.encode: special tokens written out (a chat template's) become those tokens
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.hf.decode([int(i) for i in ids])

    def encode_batch(self, texts):
        # corpora are ordinary text: a literal "<|im_end|>" in the data must not become the special token
        return self.hf(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]



# Word-level tokenizer rules (the elastic vocabulary's): text is lowercased (case is not kept: "Oslo"
# and "oslo" are one word, and replies come out lowercase); a word is a run of letters and digits,
# optionally with an inner apostrophe ("don't", "bob's"); every other non-space character is a token of
# its own (punctuation is split off); "<name>" in the text is a special token; spaces only separate.
WORD_RE = re.compile(r"<[a-z]+>|[a-z0-9]+(?:'[a-z0-9]+)*|[^\sa-z0-9]")
PAD, BOS, EOS, UNK, USER, BOT = "<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<bot>"
SPECIALS = (PAD, BOS, EOS, UNK, USER, BOT)  # ids 0..5 in every WordVocab, never pruned
NO_SPACE_BEFORE = set(".,!?;:)'")


class WordVocab:
    """An elastic word-level vocabulary: ids for SPECIALS and words, with per-id counts and the step at
    which each id was last seen. add() grows it (new ids at the end); prune() drops words by minimum
    count and/or down to a capacity (least recently seen first) and returns the old ids that survive,
    in their new order, so the caller can remap embeddings and optimizer state the same way
    (model.remap_vocab). Plain lists only: to_dict() goes into checkpoints and JSON files."""
    name = "word"

    def __init__(self, words=(), counts=None, last_seen=None):
        words = list(words) or list(SPECIALS)
        if tuple(words[:len(SPECIALS)]) != SPECIALS:
            raise DataError(f"a word vocabulary starts with the special tokens {SPECIALS}, got {words[:len(SPECIALS)]}")
        self.words = words
        self.stoi = {w: i for i, w in enumerate(words)}
        if len(self.stoi) != len(words):
            raise DataError("a word vocabulary lists some word twice")
        self.counts = list(counts) if counts is not None else [0] * len(words)
        self.last_seen = list(last_seen) if last_seen is not None else [-1] * len(words)
        self.pad, self.bos, self.eos, self.unk, self.user, self.bot = range(len(SPECIALS))
        self.eot_token = self.eos
        self.separator = [self.eos]

    @property
    def vocab_size(self):
        return len(self.words)

    def __len__(self):
        return len(self.words)

    def __contains__(self, word):
        return word in self.stoi

    @staticmethod
    def tokenize(text):
        return WORD_RE.findall(text.lower())

    def add(self, words, step=-1):
        """Give each unknown word a new id (in order of first appearance); returns the new words."""
        new = []
        for w in words:
            if w not in self.stoi:
                self.stoi[w] = len(self.words)
                self.words.append(w)
                self.counts.append(0)
                self.last_seen.append(step)
                new.append(w)
        return new

    def observe(self, ids, step):
        """Count the ids as seen once each at `step` (what pruning by count and by recency reads)."""
        for i in ids:
            self.counts[i] += 1
            self.last_seen[i] = max(self.last_seen[i], step)

    def encode(self, text):
        """Ids of the words; a word not in the vocabulary becomes <unk> (add() it first to keep it)."""
        return self.encode_words(self.tokenize(text))

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids, skip_special=True):
        out = ""
        for i in ids:
            w = self.words[i]
            if skip_special and i in (self.pad, self.bos, self.eos):
                continue
            out += w if not out or w[0] in NO_SPACE_BEFORE else " " + w
        return out

    def prune(self, min_count=0, capacity=None, keep=()):
        """Drop words seen fewer than min_count times, then, over capacity, the least recently seen
        (ties: fewer counts first, then the newer id). Specials and the words in `keep` always stay.
        Returns the surviving old ids in their new order (order is kept); the vocabulary is remapped."""
        protected = set(range(len(SPECIALS))) | {self.stoi[w] for w in keep if w in self.stoi}
        if capacity is not None and capacity < len(protected):
            raise DataError(f"vocabulary capacity {capacity} is below the {len(protected)} special tokens and "
                            "protected words (at chat time: the words the model was trained with); raise it")
        alive = [i for i in range(len(self.words)) if i in protected or self.counts[i] >= min_count]
        if capacity is not None and len(alive) > capacity:
            evictable = sorted((i for i in alive if i not in protected),
                               key=lambda i: (self.last_seen[i], self.counts[i], -i))
            dropped = set(evictable[:len(alive) - capacity])
            alive = [i for i in alive if i not in dropped]
        self.words = [self.words[i] for i in alive]
        self.counts = [self.counts[i] for i in alive]
        self.last_seen = [self.last_seen[i] for i in alive]
        self.stoi = {w: i for i, w in enumerate(self.words)}
        return alive

    def to_dict(self):
        return {"words": list(self.words), "counts": list(self.counts), "last_seen": list(self.last_seen)}

    @classmethod
    def from_dict(cls, d):
        """The vocabulary to_dict() wrote; a damaged one (wrong types, lists of other lengths) is a DataError."""
        problem = check_fields(d, {"words": list}) if isinstance(d, dict) else "not a JSON object"
        if problem is None and not all(isinstance(w, str) for w in d["words"]):
            problem = "its words are not all strings"
        for key in ("counts", "last_seen"):
            value = d.get(key) if problem is None else None
            if value is not None and (not isinstance(value, list) or len(value) != len(d["words"])
                                      or not all(isinstance(c, int) for c in value)):
                problem = f'"{key}" is not a list of integers, one per word'
        if problem:
            raise DataError(f"the word vocabulary is damaged: {problem}")
        return cls(d["words"], d.get("counts"), d.get("last_seen"))

    @classmethod
    def from_texts(cls, texts, step=-1):
        vocab = cls()
        for text in texts:
            ids = vocab.encode_words(vocab.tokenize(text), grow=True, step=step)
            vocab.observe(ids, step)
        return vocab

    def encode_words(self, words, grow=False, step=-1):
        """Ids of already tokenized words; with grow, unknown words are added first."""
        if grow:
            self.add(words, step)
        return [self.stoi.get(w, self.unk) for w in words]


def get_tokenizer(meta):
    if meta["tokenizer"] == "gpt2":
        return GPT2Tokenizer()
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["chars"])
    if meta["tokenizer"] == "word":
        return WordVocab.from_dict(meta["vocab"])
    if meta["tokenizer"] == "hf":
        return HFTokenizer(meta["tokenizer_name"])
    raise DataError(f"unknown tokenizer {meta['tokenizer']!r} (expected 'char', 'gpt2', 'word' or 'hf')")


def token_dtype(vocab_size):
    # uint16 halves the files; ids run from 0 to vocab_size - 1, so it fits up to 2**16 tokens
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def check_meta_compatible(a, b):
    """Raise DataError unless a and b were made with the same tokenizer (e.g. a checkpoint's and a dataset's)."""
    for key in ("tokenizer", "tokenizer_name", "vocab_size", "chars"):
        # a bare {"tokenizer": "gpt2"} (pretrained GPT-2) has no vocab_size; the name alone pins it down
        if key in a and key in b and a[key] != b[key]:
            if key == "chars":
                diff = "".join(sorted(set(a["chars"]) ^ set(b["chars"])))
                detail = f"char tables differ in {diff!r}"
            else:
                detail = f"{key} {a[key]!r} vs {b[key]!r}"
            raise DataError(f"tokenizer mismatch: {detail}; a model only works with the tokenizer it was trained "
                            f"with: use data prepared with the same one, or start a new model")


# -----------------------------------------------------------------------------
# reading prepared data

def _prepare_command(data_dir):
    name = data_dir.name if data_dir.name in DATASETS else "NAME"
    command = f"python prepare.py {name}"
    if data_dir != Path("data") / name:
        command += f" --out_dir {data_dir}"
    return command


# the fields of meta.json that readers rely on, and their types (plus those of its kind of tokenizer)
META_FIELDS = {"tokenizer": str, "vocab_size": int, "dtype": str, "train_tokens": int, "val_tokens": int}
TOKENIZER_FIELDS = {"char": {"chars": list}, "word": {"vocab": dict}, "hf": {"tokenizer_name": str}}


def load_meta(data_dir):
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    rerun = f"re-run: {_prepare_command(data_dir)}"
    if not path.exists():
        raise DataError(f"no prepared dataset in {data_dir} (meta.json missing); run: {_prepare_command(data_dir)}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is damaged (not JSON: {e}); {rerun}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} is damaged (a JSON {type(meta).__name__}, not an object); {rerun}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {meta.get('format_version')!r}, this code reads "
                        f"{FORMAT_VERSION}; {rerun}")
    problem = check_fields(meta, {**META_FIELDS, **TOKENIZER_FIELDS.get(meta.get("tokenizer"), {})})
    if problem is None and meta["dtype"] not in ("uint16", "uint32"):
        problem = f'"dtype" is {meta["dtype"]!r}, not uint16 or uint32'
    if problem is None and min(meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) < 0:
        problem = "a negative vocab_size or token count"
    if problem:
        raise DataError(f"{path} is damaged: {problem}; {rerun}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        bin_path = data_dir / f"{split}.bin"
        expected = meta[f"{split}_tokens"] * itemsize
        size = bin_path.stat().st_size if bin_path.exists() else None
        if size != expected:
            found = "is missing" if size is None else f"has {size} bytes"
            raise DataError(f"{bin_path} {found} but meta.json says {expected} (truncated or mismatched); {rerun}")
    return meta


def open_split(data_dir, split, meta):
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r")


def load_doc_starts(data_dir, split, n_tokens):
    """Start offsets (int64) of the documents of a split, from {split}_docs.npy (written by prepare)."""
    data_dir = Path(data_dir)
    path = data_dir / f"{split}_docs.npy"
    if not path.exists():
        raise DataError(f"{path} is missing: this dataset was prepared without document boundaries; "
                        f"re-run: {_prepare_command(data_dir)}")
    starts = np.load(path, allow_pickle=False)
    if starts.ndim != 1 or len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= n_tokens:
        raise DataError(f"{path} does not hold increasing document starts inside the {n_tokens} tokens of "
                        f"{split}.bin; re-run: {_prepare_command(data_dir)}")
    return starts


def split_documents(data_dir: str, split: str) -> list:
    """The documents of a prepared split, as int64 arrays."""
    meta = load_meta(data_dir)
    data = open_split(data_dir, split, meta)
    starts = load_doc_starts(data_dir, split, len(data))
    ends = list(starts[1:]) + [len(data)]
    return [np.asarray(data[a:b], dtype=np.int64) for a, b in zip(starts, ends)]


def longrange_documents(path: str, split: str, tokenizer, limit: int | None = None) -> list[dict]:
    """The documents of a long-range dataset (passkey, facts_long) with their queries; each query gets
    `span`, the positions of the tokens that spell its answer (the char offsets of longrange_{split}.jsonl
    mapped onto tokens, so any tokenizer works)."""
    path_records = os.path.join(path, f"longrange_{split}.jsonl")
    if not os.path.isfile(path_records):
        raise DataError(f"{path_records} is missing: eval='longrange' and answer_loss need a dataset prepared by "
                        "passkey or facts_long (python prepare.py passkey)")
    with open(path_records) as f:
        records = [json.loads(line) for line in f]
    docs = split_documents(path, split)
    if len(docs) != len(records):
        raise DataError(f"{path}: {len(docs)} documents in {split}.bin but {len(records)} lines in "
                        f"{path_records}; prepare the dataset again")
    out = []
    for tokens, rec in list(zip(docs, records))[:limit]:
        if getattr(tokenizer, "name", None) == "char":  # one token per character
            ends = np.arange(1, len(tokens) + 1)
        else:
            ends = np.cumsum([len(tokenizer.decode([int(t)])) for t in tokens])
        starts = np.r_[0, ends[:-1]]
        queries = []
        for q in rec["queries"]:
            a, b = q["answer_start"], q["answer_start"] + len(q["answer"])
            span = np.nonzero((starts < b) & (ends > a))[0]
            if len(span) == 0 or span[0] == 0 or q["answer"] not in tokenizer.decode([int(t) for t in tokens[span]]):
                raise DataError(f"{path}: a query's answer {q['answer']!r} is not where {path_records} says")
            queries.append({**q, "span": span})
        out.append({"tokens": tokens, "queries": queries, "record": rec})
    return out


def answer_positions(path: str, split: str, meta: dict) -> np.ndarray:
    """Sorted offsets, in {split}.bin, of every token that spells a long-range query's answer (passkey,
    facts_long): what train.py's answer_loss weighs."""
    docs = longrange_documents(path, split, get_tokenizer(meta))
    starts = np.cumsum([0] + [len(d["tokens"]) for d in docs[:-1]])  # the documents lie end to end in the split
    return np.sort(np.concatenate([starts[i] + q["span"] for i, d in enumerate(docs) for q in d["queries"]]
                                  + [np.zeros(0, dtype=np.int64)])).astype(np.int64)


# -----------------------------------------------------------------------------
# document streams: each split is a sequence of documents, tokenized into pieces (new_doc, ids)

_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def text_chunks(text):
    """Cut text into pieces of about CHUNK_CHARS, only at a newline between two non-space characters:
    GPT-2's pre-tokenizer always makes such a newline a token of its own, so the pieces encode
    exactly as the whole text would."""
    start = 0
    while len(text) - start > CHUNK_CHARS:
        cut = _CUT.search(text, start + CHUNK_CHARS)
        if cut is None:
            break
        yield text[start:cut.end()]
        start = cut.end()
    yield text[start:]


class TextDocs:
    """count documents from docs(), a function returning a fresh iterator: they may be read lazily
    from files, and can be read more than once (a char table needs a pass before encoding)."""

    def __init__(self, docs, count):
        self.docs = docs
        self.count = count

    def __len__(self):
        return self.count

    def __iter__(self):
        return iter(self.docs())

    def pieces(self, tok, desc):
        batch, size = [], 0
        for doc in tqdm(self, total=len(self), desc=desc, unit="docs", delay=2):
            for i, chunk in enumerate(text_chunks(doc)):
                batch.append((i == 0, chunk))
                size += len(chunk)
            if size >= BATCH_CHARS:
                yield from self._encode(batch, tok)
                batch, size = [], 0
        yield from self._encode(batch, tok)

    @staticmethod
    def _encode(batch, tok):
        ids = tok.encode_batch([chunk for _, chunk in batch])
        return zip((new_doc for new_doc, _ in batch), ids)


def _hf_encode(batch, tok):
    return {"ids": tok.encode_batch(batch["text"])}


class HFDocs:
    """A Hugging Face dataset with a "text" column; tokenized with dataset.map over several processes."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __iter__(self):
        for batch in self.ds.iter(batch_size=1024):
            yield from batch["text"]

    def pieces(self, tok, desc):
        # a process per 10k documents at most: for small datasets the start-up costs more than it saves
        num_proc = min(NUM_PROC, len(self.ds) // 10_000) or None
        tokenized = self.ds.map(_hf_encode, fn_kwargs={"tok": tok}, batched=True, remove_columns=self.ds.column_names,
                                num_proc=num_proc, desc=f"tokenizing {desc}")
        with tqdm(total=len(tokenized), desc=f"writing {desc}", unit="docs", delay=2) as bar:
            for batch in tokenized.iter(batch_size=1024):
                for ids in batch["ids"]:
                    yield True, ids
                bar.update(len(batch["ids"]))


@dataclass
class Corpus:
    source: str  # URL, path or "built-in", for meta.json
    train: object  # TextDocs or HFDocs
    val: object
    extra_files: dict = field(default_factory=dict)  # file name -> text, written beside the .bin files


# -----------------------------------------------------------------------------
# local files

def text_files(input):
    path = Path(input)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"--input {input} does not exist")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"--input {input} is a folder with no *.txt files in it")
    return files


def read_text(path):
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def contiguous_corpus(source, texts, count, val_frac):
    """Each of the count texts from texts() gives its first 1 - val_frac to train and the rest to val,
    so val is a stretch of text the model never saw, not sentences interleaved with its training data."""
    def cut(text):
        return int(len(text) * (1 - val_frac))
    return Corpus(source, TextDocs(lambda: (t[:cut(t)] for t in texts()), count),
                  TextDocs(lambda: (t[cut(t):] for t in texts()), count))


def local_text_corpus(input, val_frac):
    files = text_files(input)
    return contiguous_corpus(str(input), lambda: map(read_text, files), len(files), val_frac)


def document_corpus(input, val_frac):
    """A file of documents separated by blank lines, or a folder with one document per *.txt file;
    the last val_frac of the documents is val."""
    files = text_files(input)
    if Path(input).is_dir():
        items, load = files, read_text  # read one at a time: a folder may hold more than fits in memory
    else:
        items = [d.strip() for d in re.split(r"\n\s*\n", read_text(files[0])) if d.strip()]
        load = str  # the items are the documents already
    if len(items) < 2:
        raise DataError(f"--input {input} holds {len(items)} document(s); train and val need at least one each")
    n_val = max(1, round(len(items) * val_frac))
    train, val = items[:-n_val], items[-n_val:]
    return Corpus(str(input), TextDocs(lambda: map(load, train), len(train)), TextDocs(lambda: map(load, val), n_val))


# -----------------------------------------------------------------------------
# datasets

def fetch(url):
    with urllib.request.urlopen(url, timeout=15) as response:
        return response.read().decode("utf-8")


def load_hf(path, what, input_hint, **kwargs):
    print(f"loading {what} from Hugging Face ({path})")
    import datasets
    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as e:  # offline, hub changes, auth...: the fix is the same, a local copy
        raise DataError(f"could not load {what} from Hugging Face ({_first_line(e)}); "
                        f"pass --input {input_hint}") from None


def load_shakespeare(input, val_frac, seed):
    if input:
        return local_text_corpus(input, val_frac)
    print(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL}")
    try:
        text = fetch(SHAKESPEARE_URL)
    except OSError:
        raise DataError("could not download Tiny Shakespeare (offline?); pass --input path/to/input.txt "
                        "(a copy is in ../shared/data/shakespeare/input.txt)") from None
    return contiguous_corpus(SHAKESPEARE_URL, lambda: [text], 1, val_frac)


def load_tinystories(input, val_frac, seed):
    if input:
        return document_corpus(input, val_frac)
    ds = load_hf(TINYSTORIES_HF, "TinyStories", "path/to/stories.txt (stories separated by blank lines; "
                 "a sample is in ../shared/data/tinystories/valid_head.txt)")
    return Corpus(f"https://huggingface.co/datasets/{TINYSTORIES_HF}", HFDocs(ds["train"]), HFDocs(ds["validation"]))


def load_openwebtext(input, val_frac, seed):
    if input:
        return document_corpus(input, val_frac)
    ds = load_hf(OPENWEBTEXT_HF, "OpenWebText", "FILE_OR_FOLDER (one document per *.txt file, "
                 "or one file with documents separated by blank lines)", num_proc=NUM_PROC)
    # OpenWebText comes as a single split; hold out a random val_frac of its documents
    split = ds["train"].train_test_split(test_size=val_frac, seed=seed, shuffle=True)
    return Corpus(f"https://huggingface.co/datasets/{OPENWEBTEXT_HF}", HFDocs(split["train"]), HFDocs(split["test"]))


# Tiny Shakespeare is excerpts of nine plays, one after another with no title between them; each
# begins at its first speech, found here by its opening words (unique in the file)
SHAKESPEARE_PLAYS = [
    ("Coriolanus", "First Citizen:\nBefore we proceed"),
    ("Richard III", "GLOUCESTER:\nNow is the winter"),
    ("Richard II", "KING RICHARD II:\nOld John of Gaunt"),
    ("Romeo and Juliet", "SAMPSON:\nGregory, o' my word"),
    ("Henry VI, Part 3", "WARWICK:\nI wonder how the king escaped"),
    ("The Winter's Tale", "ARCHIDAMUS:\nIf you shall chance"),
    ("Measure for Measure", "DUKE VINCENTIO:\nEscalus."),
    ("The Taming of the Shrew", "SLY:\nI'll pheeze you"),
    ("The Tempest", "Master:\nBoatswain!"),
]


def split_at_blank_line(text, frac):
    """(head, tail) of text cut at the first blank line after frac of it (a speech or paragraph end)."""
    cut = text.find("\n\n", int(len(text) * frac))
    cut = len(text) if cut < 0 else cut
    return text[:cut].strip(), text[cut:].strip()


def load_shakespeare_plays(input, val_frac, seed):
    """One document per play: the first 1 - val_frac of every play (cut at a speech end) is a train
    document, the rest a val document, so val holds the end of each play and train its start."""
    corpus = load_shakespeare(input, val_frac, seed)
    text = next(iter(corpus.train.docs())) + next(iter(corpus.val.docs()))  # the whole file, back together
    starts = []
    for title, opening in SHAKESPEARE_PLAYS:
        if text.count(opening) != 1:
            raise DataError(f"{corpus.source} is not Tiny Shakespeare: the opening of {title} ({opening!r}) "
                            "is not found exactly once; use the shakespeare_char dataset for other texts")
        starts.append(text.index(opening))
    plays = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    parts = [split_at_blank_line(play, 1 - val_frac) for play in plays]
    return Corpus(corpus.source, TextDocs(lambda: [p[0] for p in parts], len(parts)),
                  TextDocs(lambda: [p[1] for p in parts], len(parts)))


WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $", flags=re.MULTILINE)


def load_wikitext2_docs(input, val_frac, seed):
    """WikiText-2 articles as documents, split at their top-level " = Title = " lines; from --input
    (a folder of *.txt files such as valid.txt, test.txt, in name order, or one file), else the
    Hugging Face copy. The last val_frac of the articles is val."""
    if input:
        files = text_files(input)
        text, source = "".join(read_text(f) for f in files), str(input)
    else:
        ds = load_hf("Salesforce/wikitext", "WikiText-2", "../shared/data/wikitext2 (valid.txt, test.txt)",
                     name="wikitext-2-v1")
        text = "".join(ds["train"]["text"] + ds["validation"]["text"] + ds["test"]["text"])
        source = "https://huggingface.co/datasets/Salesforce/wikitext"
    starts = [m.start() for m in WIKITEXT_TITLE.finditer(text)]
    docs = [text[a:b].strip() for a, b in zip(starts, starts[1:] + [len(text)])]
    if len(docs) < 2:
        raise DataError(f"{source}: found {len(docs)} ' = Title = ' heading(s); train and val need two articles")
    n_val = max(1, round(len(docs) * val_frac))
    train, val = docs[:-n_val], docs[-n_val:]
    return Corpus(source, TextDocs(lambda: train, len(train)), TextDocs(lambda: val, n_val))


def load_text(input, val_frac, seed):
    if not input:
        raise DataError("the text dataset needs --input FILE_OR_FOLDER (a folder means all *.txt files under it)")
    return local_text_corpus(input, val_frac)


# -----------------------------------------------------------------------------
# facts: a synthetic corpus for reading facts from context and answering questions about them

# training people get invented names, thousands of them, so a model cannot learn anything about a
# name by heart and has to read every document; the people of val and recall.jsonl have real first
# names that never occur in train.bin, so those measure reading facts about unseen entities
NAME_ONSETS = ["b", "br", "c", "ch", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "pr", "qu",
               "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z"]
NAME_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ie", "ou", "y"]
NAME_CODAS = ["", "", "n", "l", "r", "s", "th", "nd", "m", "x", "ck", "ne", "tte"]
FACTS_HELDOUT_NAMES = [
    "Ottoline", "Bartholomew", "Cressida", "Dorothea", "Ezekiel", "Fenella", "Gideon", "Hyacinth", "Ignatius",
    "Jemima", "Kasimir", "Lucinda", "Montgomery", "Nerissa", "Octavius", "Perpetua", "Thaddeus", "Wilhelmina",
    "Cornelius", "Imogen",
]
# surnames of the held-out people
FACTS_LAST_NAMES = [
    "Quill", "Stone", "Marsh", "Fletcher", "Hale", "Brook", "Carver", "Dale", "Ellis", "Frost", "Gray", "Hart",
    "Irwin", "Joyce", "Kemp", "Lowe", "Moss", "Nash", "Oakes", "Pike", "Reed", "Shaw", "Thorne", "Vance", "Wells",
    "York", "Ashby", "Birch", "Crane", "Doyle", "Finch", "Gale", "Holt", "Keane", "Lamb", "Mercer", "North", "Price",
    "Rowe", "Sykes",
]
FACTS_VALUES = {
    "city": ["Oslo", "Lisbon", "Porto", "Dublin", "Vienna", "Prague", "Krakow", "Tallinn", "Riga", "Bergen", "Lyon",
             "Seville", "Turin", "Leeds", "Bristol", "Glasgow", "Cardiff", "Utrecht", "Ghent", "Zurich", "Geneva",
             "Quebec", "Denver", "Nairobi", "Osaka", "Perth", "Auckland", "Halifax"],
    # pets and jobs all start with a consonant, so the templates can say "a {pet}", "a {job}"
    "pet": ["cat", "dog", "parrot", "rabbit", "hamster", "tortoise", "goldfish", "ferret", "budgie", "lizard",
            "pony", "snake"],
    "pet_name": ["Biscuit", "Pepper", "Mango", "Noodle", "Pickle", "Waffle", "Ziggy", "Bramble", "Clover", "Dumpling",
                 "Fudge", "Gizmo", "Hopper", "Jellybean", "Kiwi", "Marble", "Nugget", "Peanut", "Pudding", "Rocket",
                 "Sprout", "Toffee", "Truffle", "Widget", "Button", "Comet", "Sardine", "Pebble", "Muffin", "Socks"],
    "colour": ["teal", "crimson", "amber", "violet", "olive", "navy", "coral", "indigo", "maroon", "silver", "gold",
               "turquoise", "lavender", "mustard", "scarlet"],
    "age": [str(age) for age in range(18, 91)],
    "job": ["baker", "nurse", "pilot", "plumber", "teacher", "chemist", "carpenter", "dentist", "farmer", "gardener",
            "journalist", "librarian", "mechanic", "painter", "potter", "sailor", "tailor", "vet", "writer", "cook",
            "dancer", "lawyer", "firefighter", "banker"],
}
FACTS_TEMPLATES = {
    "city": ["{name} lives in {city}.", "{name} has a flat in {city}.", "{name} moved to {city} last spring."],
    "pet": ["{name} has a {pet} called {pet_name}.", "{name}'s {pet} is named {pet_name}.",
            "{name} looks after a {pet} named {pet_name}."],
    "colour": ["{name}'s favourite colour is {colour}.", "{name} likes {colour} more than any other colour.",
               "{name} always picks something {colour}."],
    "age": ["{name} is {age} years old.", "{name} turned {age} this year.", "{name} is aged {age}."],
    "job": ["{name} works as a {job}.", "{name} earns a living as a {job}.", "{name} is a {job} by trade."],
}
FACTS_QUESTIONS = {
    "city": "Where does {name} live?",
    "pet": "What kind of pet does {name} have?",
    "pet_name": "What is the name of {name}'s pet?",
    "colour": "What is {name}'s favourite colour?",
    "age": "How old is {name}?",
    "job": "What does {name} do for a living?",
}
FACTS_DOCS = 20000  # train + val; about 9 MB of text, so the quickstart's training sees a document about once
FACTS_TOPICS = (2, 4)  # facts stated per person (min, max)
FACTS_QAS = (4, 6)  # questions asked per document (min, max)
FACTS_TRAIN_PEOPLE = 20000  # invented full names
FACTS_RECALL_ITEMS = 200


def invented_name(rng):
    def word(syllables):
        return ("".join(rng.choice(NAME_ONSETS) + rng.choice(NAME_VOWELS) for _ in range(syllables))
                + rng.choice(NAME_CODAS)).capitalize()
    return f"{word(rng.randint(1, 3))} {word(rng.randint(1, 2))}"


def facts_train_names(n, rng):
    """n distinct invented full names, none containing a held-out first name."""
    names = set()
    while len(names) < n:
        name = invented_name(rng)
        if not any(heldout in name for heldout in FACTS_HELDOUT_NAMES):
            names.add(name)
    return sorted(names)


def facts_prompt(question):
    return f"Q: {question}\nA:"


def facts_scene(names, rng):
    """Fact sentences about the named people, shuffled together, and the questions they answer.
    Attributes are drawn afresh for every scene: the only way to answer is to read the facts."""
    sentences, qas = [], []
    for name in names:
        person = {attribute: rng.choice(values) for attribute, values in FACTS_VALUES.items()}
        for topic in rng.sample(list(FACTS_TEMPLATES), rng.randint(*FACTS_TOPICS)):
            sentences.append(rng.choice(FACTS_TEMPLATES[topic]).format(name=name, **person))
            # a pet sentence states both the kind of pet and its name
            for attribute in ("pet", "pet_name") if topic == "pet" else (topic,):
                qas.append({"question": FACTS_QUESTIONS[attribute].format(name=name), "answer": person[attribute],
                            "entity": name, "attribute": attribute})
    rng.shuffle(sentences)
    return " ".join(sentences), qas


def facts_documents(n_docs, names, rng):
    """Documents about 1-3 of names: a line of facts, then FACTS_QAS "Q: ...\\nA: ..." pairs about
    them (fewer when fewer facts were stated). Many questions per document make the answers, the
    only tokens that reading the facts predicts, a dense part of the loss."""
    docs = []
    for _ in range(n_docs):
        facts, qas = facts_scene(rng.sample(names, rng.randint(1, 3)), rng)
        asked = rng.sample(qas, min(len(qas), rng.randint(*FACTS_QAS)))
        docs.append("\n".join([facts] + [f"{facts_prompt(qa['question'])} {qa['answer']}" for qa in asked]))
    return docs


def facts_recall_items(n_items, names, rng):
    """Evaluation items: facts about 1-2 of names as memory, and one question whose answer is in it."""
    items = []
    for _ in range(n_items):
        memory, qas = facts_scene(rng.sample(names, rng.randint(1, 2)), rng)
        qa = rng.choice(qas)
        items.append({"memory": memory, "prompt": facts_prompt(qa["question"]), "answers": [qa["answer"]],
                      "entity": qa["entity"], "attribute": qa["attribute"]})
    return items


def load_facts(input, val_frac, seed):
    if input:
        raise DataError("facts is generated, not read: drop --input (use --seed for a different corpus)")
    rng = random.Random(seed)
    train_names = facts_train_names(FACTS_TRAIN_PEOPLE, rng)
    heldout_names = [f"{f} {l}" for f in FACTS_HELDOUT_NAMES for l in FACTS_LAST_NAMES]
    n_val = max(1, round(FACTS_DOCS * val_frac))
    train = facts_documents(FACTS_DOCS - n_val, train_names, rng)
    val = facts_documents(n_val, heldout_names, rng)
    # recall.jsonl reports the memory's recall; recall_tune.jsonl, drawn apart, is for choosing its settings
    recall = {file: "".join(json.dumps(item) + "\n" for item in facts_recall_items(FACTS_RECALL_ITEMS, heldout_names, rng))
              for file in ("recall.jsonl", "recall_tune.jsonl")}
    return Corpus("built-in", TextDocs(lambda: train, len(train)), TextDocs(lambda: val, len(val)), recall)


# -----------------------------------------------------------------------------
# dialogs: multi-turn conversations that state facts about the user, chat a little, then ask about them
#
# One line of dialogs_{train,val,test}.jsonl is one dialogue: {"turns": [{"user", "bot", "kind", ...}],
# "entities": [...]}. kind is "fact" (with "attribute" and "answer"), "chat" (a distractor) or "question"
# (with "attribute", "answer", "fact_turn": the turn that stated it, "repeat": asked before). "entities"
# lists the words that carry facts: the seq2seq trainer swaps them for fresh random embeddings so the
# model learns to copy whatever word the user gives (seq2seq_batch). train.bin/val.bin hold the same
# dialogues as flat word ids ("<user> ... <bot> ..."), for the GPT.

# names for training are invented from syllables; validation and test use real first names, half each,
# none of which can come out of the syllable generator's pool (checked in load_dialogs)
DIALOG_HELDOUT_NAMES = [
    "alice", "bruno", "clara", "diego", "elena", "felix", "greta", "hugo", "irene", "jonas", "karla", "lukas",
    "maria", "nadia", "oscar", "paula", "quentin", "rosa", "stefan", "tilda", "ulrich", "vera", "walter", "xenia",
    "yusuf", "zoe", "agnes", "boris", "cecile", "dmitri", "esther", "fabio", "gloria", "henrik", "ingrid", "jasper",
    "katrin", "lorenzo", "magnus", "nina", "otto", "petra", "rafael", "sofia", "tobias", "ursula", "viktor",
    "wanda", "yasmin", "zeno",
]
DIALOG_VALUES = {
    "city": [c.lower() for c in FACTS_VALUES["city"]],
    "pet": FACTS_VALUES["pet"],
    "colour": FACTS_VALUES["colour"],
    "job": FACTS_VALUES["job"],
    "age": FACTS_VALUES["age"],
}
# attribute -> (statements, questions, answer, acknowledgement); {x} is the value
DIALOG_TEMPLATES = {
    "name": (["my name is {x} .", "i am {x} .", "call me {x} .", "hi , i am {x} ."],
             ["what is my name ?", "who am i ?", "do you remember my name ?"],
             "your name is {x} .", "nice to meet you , {x} ."),
    "friend": (["my best friend is {x} .", "my friend is called {x} ."],
               ["who is my best friend ?", "what is my friend called ?"],
               "your friend is {x} .", "ok ."),
    "city": (["i live in {x} .", "i moved to {x} .", "my home is in {x} ."],
             ["where do i live ?", "which city do i live in ?"],
             "you live in {x} .", "ok ."),
    "pet": (["i have a {x} .", "my pet is a {x} ."],
            ["what pet do i have ?", "what kind of pet do i have ?"],
            "you have a {x} .", "ok ."),
    "colour": (["my favourite colour is {x} .", "i like {x} best ."],
               ["what is my favourite colour ?", "which colour do i like ?"],
               "your favourite colour is {x} .", "ok ."),
    "job": (["i work as a {x} .", "my job is {x} ."],
            ["what do i do for a living ?", "what is my job ?"],
            "you are a {x} .", "ok ."),
    "age": (["i am {x} years old .", "my age is {x} ."],
            ["how old am i ?", "what is my age ?"],
            "you are {x} .", "ok ."),
}
DIALOG_CHAT = [
    ("how are you ?", "i am fine , thanks ."), ("the weather is nice today .", "it is ."),
    ("tell me a joke .", "i do not know any jokes ."), ("what time is it ?", "i do not have a clock ."),
    ("i am bored .", "let us talk then ."), ("do you like music ?", "i like all music ."),
    ("that is funny .", "i am glad ."), ("thanks for listening .", "you are welcome ."),
    ("it is raining again .", "take an umbrella ."), ("can you help me ?", "i will try ."),
]
DIALOG_COUNTS = {"train": 20000, "val": 500, "test": 1000}


def dialog(rng, names):
    """One dialogue: 1-5 facts, 0-3 chat turns, questions about 1..all facts (some asked twice), in an
    order where every question comes after its fact."""
    attributes = rng.sample(list(DIALOG_TEMPLATES), rng.randint(1, 5))
    people = rng.sample(names, 2)
    values = {"name": people[0], "friend": people[1], **{a: rng.choice(v) for a, v in DIALOG_VALUES.items()}}
    events = [("fact", a) for a in attributes] + [("chat", None)] * rng.randint(0, 3)
    rng.shuffle(events)
    asked = rng.sample(attributes, rng.randint(1, len(attributes)))
    for a in asked:  # a question goes anywhere after its fact
        events.insert(rng.randint(events.index(("fact", a)) + 1, len(events)), ("question", a))
    for a in asked:
        if rng.random() < 0.3:  # asked again later
            first = max(i for i, e in enumerate(events) if e == ("question", a))
            events.insert(rng.randint(first + 1, len(events)), ("question", a))
    turns, stated, seen = [], {}, set()
    for kind, a in events:
        if kind == "chat":
            user, bot = rng.choice(DIALOG_CHAT)
            turns.append({"user": user, "bot": bot, "kind": "chat"})
            continue
        statements, questions, answer, ack = DIALOG_TEMPLATES[a]
        x = values[a]
        if kind == "fact":
            stated[a] = len(turns)
            turns.append({"user": rng.choice(statements).format(x=x), "bot": ack.format(x=x), "kind": "fact",
                          "attribute": a, "answer": x})
        else:
            turns.append({"user": rng.choice(questions), "bot": answer.format(x=x), "kind": "question",
                          "attribute": a, "answer": x, "fact_turn": stated[a], "repeat": a in seen})
            seen.add(a)
    return {"turns": turns, "entities": sorted({values[a] for a in attributes})}


def dialog_text(d):
    return " ".join(f"{USER} {t['user']} {BOT} {t['bot']}" for t in d["turns"])


def dialog_train_names(n, rng):
    names = set()
    while len(names) < n:
        name = invented_name(rng).split()[0].lower()
        if name not in DIALOG_HELDOUT_NAMES:
            names.add(name)
    return sorted(names)


def read_dialog_turns(path):
    """A local JSONL of dialogue turns, one {"dialog": ID, "user": ..., "bot": ...} per line, turns of a
    dialogue in order (an optional "entities": [...] names the fact words of its dialogue)."""
    rows = read_jsonl(path, {"dialog": (str, int), "user": str, "bot": str}, "dialogue turns",
                      fix='one {"dialog": ID, "user": TEXT, "bot": TEXT} per line',
                      validate=lambda row: None if isinstance(row.get("entities", []), list) else
                      '"entities" is not a list of words')
    dialogs = {}
    for row in rows:
        d = dialogs.setdefault(row["dialog"], {"turns": [], "entities": []})
        d["turns"].append({"user": row["user"], "bot": row["bot"], "kind": "chat"})
        d["entities"] = sorted(set(d["entities"]) | set(row.get("entities", [])))
    if len(dialogs) < 3:
        raise DataError(f"{path} holds {len(dialogs)} dialogue(s); train, val and test need at least one each")
    return list(dialogs.values())


def hf_dialogs(ds):
    """Dialogues from a Hugging Face dataset with a "dialog" column of utterance lists (DailyDialog's
    layout): utterance 2i is the user's, 2i + 1 the bot's reply."""
    return [{"turns": [{"user": u, "bot": b, "kind": "chat"} for u, b in zip(row[0::2], row[1::2])],
             "entities": []} for row in ds["dialog"] if len(row) >= 2]


def split_dialogs(dialogs, val_frac):
    n = max(1, round(len(dialogs) * val_frac))
    return {"train": dialogs[:-2 * n], "val": dialogs[-2 * n:-n], "test": dialogs[-n:]}


def load_dialogs(input, val_frac, seed):
    if input and input.startswith("hf:"):
        ds = load_hf(input[3:], "dialogues", "a local JSONL of turns instead")
        splits = split_dialogs(hf_dialogs(ds["train"]), val_frac)
        source = f"https://huggingface.co/datasets/{input[3:]}"
    elif input:
        splits = split_dialogs(read_dialog_turns(input), val_frac)
        source = str(input)
    else:
        rng = random.Random(seed)
        half = len(DIALOG_HELDOUT_NAMES) // 2
        pools = {"train": dialog_train_names(2000, rng), "val": DIALOG_HELDOUT_NAMES[:half],
                 "test": DIALOG_HELDOUT_NAMES[half:]}
        splits = {s: [dialog(rng, pools[s]) for _ in range(n)] for s, n in DIALOG_COUNTS.items()}
        source = "built-in"
    if not splits["train"]:
        raise DataError("no training dialogues left after holding out val and test; lower --val_frac")
    files = {f"dialogs_{s}.jsonl": "".join(json.dumps(d) + "\n" for d in ds) for s, ds in splits.items()}
    texts = {s: [dialog_text(d) for d in splits[s]] for s in ("train", "val")}
    return Corpus(source, TextDocs(lambda: texts["train"], len(texts["train"])),
                  TextDocs(lambda: texts["val"], len(texts["val"])), files)


# -----------------------------------------------------------------------------
# long-range recall: documents whose answer sits many context windows after the text it copies
#
# Each document is read by the docs loader (train.py loader='docs') window after window of block_size
# from its start, so a model sees the question's window and, of the earlier windows, only what its
# memory kept. longrange_{train,val}.jsonl holds one line per document (same order as the .bin
# files): {"queries": [{"answer", "answer_start", "source_start", "distance", "windows"}], ...}. Offsets
# are characters of the document's text (tokens with the default char tokenizer): answer_start is the
# answer's first character, source_start the first character of the value it copies, distance their
# difference and windows the nominal distance in windows of the generator's block_size (the bucket the
# evaluation reports; passkey's distance is exactly round(windows * block_size) beyond the shortest).
# generator.json records the generator's settings.

LONGRANGE_BLOCK = 128  # the window the distances are counted in (the recipes' block_size)
LONGRANGE_EVAL_WINDOWS = (0.5, 1, 2, 4, 8, 16)  # val: the same number of documents at each distance
PASSKEY_FILLER = [  # no digits, no "pass key": the key is the only number in a document
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river runs to the sea.", "A bird sings in the tree.", "The wind is cold today.", "The road is long.",
    "We walk on and on.", "The hills are quiet.", "Clouds drift over the town.",
]
# the filler of the original pass-key test (Mohtashami & Jaggi 2023): these five sentences over and over, from
# a random one on; all but the key is then predictable, so the answer's digits are what is left to learn
PASSKEY_CYCLE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
PASSKEY_STATEMENT = "The pass key is {key}. Remember it. "
PASSKEY_QUESTION = "What is the pass key? The pass key is "
PASSKEY_TRAIN_DOCS = 10000
PASSKEY_VAL_PER_DISTANCE = 50


def longrange_options(options, **defaults):
    """The generator's settings: defaults updated by options (prepare.py --option KEY=VALUE), checked."""
    unknown = set(options) - set(defaults)
    if unknown:
        raise DataError(f"unknown generator option(s) {sorted(unknown)}; this dataset takes {sorted(defaults)}")
    out = {**defaults, **options}
    lo, hi = out["windows"]
    if not (0 <= lo <= hi) or out["block_size"] < 8:
        raise DataError(f"windows must be (low, high) with 0 <= low <= high, block_size >= 8; got {out}")
    return out


def filler_text(rng, n, sentences=PASSKEY_FILLER, corpus=None, cycle=False):
    """Exactly n characters of filler ending in a space ('' for n = 0): random sentences, the sentences in
    turn from a random one (cycle), or a random slice of corpus (a text without digits) when one is given."""
    if n <= 0:
        return ""
    if corpus is not None:
        a = rng.randrange(max(1, len(corpus) - n))
        text = (corpus[a:a + n] * (n // max(1, len(corpus)) + 1))[:n]
    elif cycle:
        i, out, size = rng.randrange(len(sentences)), [], 0
        while size < n:
            out.append(sentences[i % len(sentences)] + " ")
            size += len(out[-1])
            i += 1
        text = "".join(out)[:n]
    else:
        out, size = [], 0
        while size < n:
            s = rng.choice(sentences) + " "
            out.append(s)
            size += len(s)
        text = "".join(out)[:n]
    return text[:-1] + " "


def passkey_document(rng, key: str, windows: float, block_size: int, corpus=None, filler="cycle",
                     fit: bool = False) -> tuple[str, dict]:
    """A random lead of filler (so the key falls anywhere in its window), the key stated once, filler,
    the question and the answer. The answer's first digit is round(windows * block_size) characters
    after the key's first (or the shortest distance the sentences allow, 58 characters). filler: 'cycle'
    (PASSKEY_CYCLE in turn), 'random' (PASSKEY_FILLER sentences drawn at random); corpus: a text instead.
    fit: the lead is short enough for the whole document to fit in one window (where it can be)."""
    if filler not in ("cycle", "random"):
        raise DataError(f"passkey filler={filler!r}; choose 'cycle' or 'random' (or --input a text file)")
    sentences, cycle = (PASSKEY_CYCLE, True) if filler == "cycle" else (PASSKEY_FILLER, False)
    statement = PASSKEY_STATEMENT.format(key=key)
    fixed = len(statement) - PASSKEY_STATEMENT.index("{key}") + len(PASSKEY_QUESTION)
    gap = max(0, round(windows * block_size) - fixed)
    rest = len(statement) + gap + len(PASSKEY_QUESTION) + len(key) + 1
    lead = filler_text(rng, rng.randrange(max(1, block_size - rest) if fit else block_size), sentences, corpus, cycle)
    source_start = len(lead) + PASSKEY_STATEMENT.index("{key}")
    text = lead + statement + filler_text(rng, gap, sentences, corpus, cycle) + PASSKEY_QUESTION + key + "."
    answer_start = len(text) - len(key) - 1
    query = {"answer": key, "answer_start": answer_start, "source_start": source_start,
             "distance": answer_start - source_start, "windows": windows}
    # the windows the key is read in and the answer's first digit is predicted in (from the token before it)
    return text, {"queries": [query], "key_window": source_start // block_size,
                  "answer_window": (answer_start - 1) // block_size}


def log_uniform(rng, lo, hi):
    return lo if lo == hi else math.exp(rng.uniform(math.log(lo), math.log(hi)))


def passkey_corpus_filler(input, val_frac):
    """(train, val) filler texts from a local text file: digits dropped, whitespace made single spaces;
    val filler comes from the file's last val_frac."""
    text = re.sub(r"\s+", " ", re.sub(r"[0-9]", "", read_text(text_files(input)[0])))
    cut = int(len(text) * (1 - val_frac))
    if cut < 200 or len(text) - cut < 200:
        raise DataError(f"--input {input}: too little text for filler ({len(text)} characters)")
    return text[:cut], text[cut:]


def load_passkey(input, val_frac, seed, **options):
    """The pass-key retrieval task: a random 5-digit key stated once, filler, then the question and the
    key. Training distances are log-uniform in `windows` (in windows of block_size); val has
    n_val documents at each of eval_windows. Keys are held out: val keys never occur in training.
    filler: 'cycle' (the original test's five sentences in turn) or 'random' (twelve sentences drawn at
    random); --input: a text file to draw filler from instead. fit: training documents short enough for
    one window start within it (a curriculum's first stage: every key in its question's window).
    drill > 0: training documents are copy drills instead, drill keys each written `repeats` times in
    turn: drill_style 'numbers' writes nothing else ("48213 48213 48213 48213. 90211 ..."), 'statements'
    writes "The pass key is 48213." each time, after 0 to `spread` characters of filler; 'windows' writes a
    random string of block_size digits `repeats` times, so that each window repeats the one before it:
    only a memory of the previous window predicts it (the Memorizing layer's test in isolation)."""
    o = longrange_options(options, block_size=LONGRANGE_BLOCK, windows=(0.5, 16.0), eval_windows=LONGRANGE_EVAL_WINDOWS,
                         n_train=PASSKEY_TRAIN_DOCS, n_val=PASSKEY_VAL_PER_DISTANCE, filler="cycle", fit=False,
                         drill=0, repeats=2, drill_style="numbers", spread=48)
    rng = random.Random(seed)
    keys = [str(k) for k in range(10000, 100000)]
    rng.shuffle(keys)
    held = len(keys) // 10  # val keys: a tenth of all 5-digit numbers, never used in training
    pools = {"val": keys[:held], "train": keys[held:]}
    fillers = passkey_corpus_filler(input, val_frac) if input else (None, None)
    docs = {"train": [], "val": []}
    for i in range(o["n_train"]):
        if o["drill"]:  # copy drills, no question (see the docstring)
            keys_i = [rng.choice(pools["train"]) for _ in range(o["drill"])]
            if o["drill_style"] == "windows":  # a random digit string of one window, then its copies: window w
                block = "".join(rng.choice("0123456789") for _ in range(o["block_size"]))  # is window w - 1 again
                docs["train"].append((block * o["repeats"], {"queries": [], "drill": "windows"}))
                continue
            if o["drill_style"] == "numbers":
                text = " ".join(" ".join([k] * o["repeats"]) + "." for k in keys_i)
            else:
                text = "".join(filler_text(rng, rng.randint(0, o["spread"]), PASSKEY_CYCLE, None, True)
                               + f"The pass key is {k}. " for k in keys_i for _ in range(o["repeats"]))
            docs["train"].append((text.strip(), {"queries": [], "drill": keys_i}))
            continue
        w = round(log_uniform(rng, *o["windows"]), 3)
        docs["train"].append(passkey_document(rng, rng.choice(pools["train"]), w, o["block_size"], fillers[0],
                                              o["filler"], o["fit"]))
    for i in range(o["n_val"] * len(o["eval_windows"])):  # distances interleaved: any prefix covers them all
        if o["drill"] and o["drill_style"] == "windows":  # val is window copies too: each copy an answer
            T = o["block_size"]
            block = "".join(rng.choice("0123456789") for _ in range(T))
            queries = [{"answer": block, "answer_start": w * T, "source_start": (w - 1) * T, "distance": T,
                        "windows": 1.0} for w in range(1, o["repeats"])]
            docs["val"].append((block * o["repeats"], {"queries": queries}))
            continue
        w = float(o["eval_windows"][i % len(o["eval_windows"])])
        docs["val"].append(passkey_document(rng, rng.choice(pools["val"]), w, o["block_size"], fillers[1], o["filler"]))
    return longrange_corpus("built-in" if not input else str(input), docs, {"task": "passkey", "seed": seed, **o})


# facts with open-set values: every attribute value is an invented word (or a number), drawn afresh for each
# person, and the values of val (and of recall.jsonl) are never used in training, so answering means copying
# the value from the facts, never recalling it from the weights
FACTS_OPEN_SYLLABLES = {"city": (2, 3), "pet": (1, 2), "pet_name": (2, 2), "colour": (2, 2), "job": (2, 3)}
FACTS_OPEN_CAPITALIZED = ("city", "pet_name")


def value_is_heldout(value: str) -> bool:
    """The split of the open value set: a fifth of all values (by a hash) belongs to val only."""
    return zlib.crc32(value.encode()) % 5 == 0


def open_value(rng, attribute: str, heldout: bool) -> str:
    while True:
        if attribute == "age":
            value = str(rng.randint(10, 99))
        else:
            lo, hi = FACTS_OPEN_SYLLABLES[attribute]
            value = "".join(rng.choice(NAME_ONSETS) + rng.choice(NAME_VOWELS) for _ in range(rng.randint(lo, hi)))
            value += rng.choice(NAME_CODAS)
            if attribute in FACTS_OPEN_CAPITALIZED:
                value = value.capitalize()
        if value_is_heldout(value) == heldout:
            return value


def facts_open_scene(names, rng, heldout: bool, topics=None):
    """facts_scene with open values: (the facts line, its questions), each question with "source_start",
    the offset of its value in the line. topics: what every person's facts are about (default: 2-4
    topics drawn for each person)."""
    sentences = []  # (sentence, [(attribute, value, person name)])
    for name in names:
        person = {attribute: open_value(rng, attribute, heldout) for attribute in FACTS_VALUES}
        for topic in topics or rng.sample(list(FACTS_TEMPLATES), rng.randint(*FACTS_TOPICS)):
            attributes = ("pet", "pet_name") if topic == "pet" else (topic,)
            sentences.append((rng.choice(FACTS_TEMPLATES[topic]).format(name=name, **person),
                              [(a, person[a], name) for a in attributes]))
    rng.shuffle(sentences)
    qas, pos = [], 0
    for sentence, facts in sentences:
        for attribute, value, name in facts:
            m = re.search(rf"\b{re.escape(value)}\b", sentence[len(name):])  # every template starts with the name
            qas.append({"question": FACTS_QUESTIONS[attribute].format(name=name), "answer": value, "entity": name,
                        "attribute": attribute, "source_start": pos + len(name) + m.start()})
        pos += len(sentence) + 1
    return " ".join(s for s, _ in sentences), qas


def facts_open_document(rng, names, heldout: bool):
    """A facts document (facts line, then 4-6 Q/A lines) with open values, and its longrange record."""
    facts, qas = facts_open_scene(rng.sample(names, rng.randint(1, 3)), rng, heldout)
    asked = rng.sample(qas, min(len(qas), rng.randint(*FACTS_QAS)))
    return facts_with_questions(facts + "\n", asked, 0)


def facts_with_questions(head: str, asked, windows):
    """head, then a Q/A line per question; the record's offsets point into the result."""
    text, queries = head, []
    for i, qa in enumerate(asked):
        line = facts_prompt(qa["question"]) + " "
        start = len(text) + len(line)
        queries.append({"answer": qa["answer"], "answer_start": start, "source_start": qa["source_start"],
                        "distance": start - qa["source_start"], "windows": windows, "attribute": qa["attribute"],
                        "entity": qa["entity"]})
        text += line + qa["answer"] + ("\n" if i < len(asked) - 1 else "")
    return text, {"queries": queries}


def load_facts_open(input, val_frac, seed):
    """The facts corpus with open-set values (invented words and numbers, val's never seen in training); the
    same sizes as facts, so the quickstart's budget trains it. recall.jsonl / recall_tune.jsonl: the facts
    recall items (sample.py eval='recall'), with held-out people and values."""
    if input:
        raise DataError("facts_open is generated, not read: drop --input (use --seed for a different corpus)")
    rng = random.Random(seed)
    train_names = facts_train_names(FACTS_TRAIN_PEOPLE, rng)
    heldout_names = [f"{f} {l}" for f in FACTS_HELDOUT_NAMES for l in FACTS_LAST_NAMES]
    n_val = max(1, round(FACTS_DOCS * val_frac))
    docs = {"train": [facts_open_document(rng, train_names, False) for _ in range(FACTS_DOCS - n_val)],
            "val": [facts_open_document(rng, heldout_names, True) for _ in range(n_val)]}
    corpus = longrange_corpus("built-in", docs, {"task": "facts_open", "seed": seed})
    for file in ("recall.jsonl", "recall_tune.jsonl"):
        items = []
        for _ in range(FACTS_RECALL_ITEMS):
            memory, qas = facts_open_scene(rng.sample(heldout_names, rng.randint(1, 2)), rng, True)
            qa = rng.choice(qas)
            items.append({"memory": memory, "prompt": facts_prompt(qa["question"]), "answers": [qa["answer"]],
                          "entity": qa["entity"], "attribute": qa["attribute"]})
        corpus.extra_files[file] = "".join(json.dumps(item) + "\n" for item in items)
    return corpus


FACTS_LONG_TRAIN_DOCS = 10000
FACTS_LONG_BLOCK = 256  # a facts line is up to ~400 characters: windows of 256 keep most in one or two
FACTS_LONG_VAL_PER_DISTANCE = 50


def facts_long_document(rng, names, windows: float, block_size: int, heldout: bool, people=(1, 2),
                        rivals=False):
    """Facts about `people` (low, high) people, then round(windows * block_size) characters of other
    people's facts and questions (whole facts documents, the last one cut), then 2-4 questions about the
    first people. rivals: every person of the document, asked or not, has facts about the same topics, so
    facts differ only in whose they are. Returns (text, record) and every value stated whole before the
    questions, the asked people's and the distractors': {"start", "value", "entity", "attribute"}
    (eval='longrange' says whose the memory read)."""
    targets = rng.sample(names, rng.randint(*people))
    topics = rng.sample(list(FACTS_TEMPLATES), rng.randint(*FACTS_TOPICS)) if rivals else None
    facts, qas = facts_open_scene(targets, rng, heldout, topics)
    asked = rng.sample(qas, min(len(qas), rng.randint(2, 4)))
    gap = round(windows * block_size)
    filler, stated = "", [(qa["source_start"], qa) for qa in qas]
    while len(filler) < gap:
        others = [n for n in rng.sample(names, 4) if n not in targets][:rng.randint(1, 3)]
        scene, other_qas = facts_open_scene(others, rng, heldout, topics)
        stated += [(len(facts) + 1 + len(filler) + q["source_start"], q) for q in other_qas]
        lines = [facts_prompt(q["question"]) + " " + q["answer"] for q in rng.sample(other_qas, min(len(other_qas), 3))]
        filler += "\n".join([scene] + lines) + "\n"
    filler = filler[:gap - 1] + "\n" if gap else ""
    stated = [{"start": at, "value": q["answer"], "entity": q["entity"], "attribute": q["attribute"]}
              for at, q in stated if at + len(q["answer"]) <= len(facts) + gap]  # the cut may end the filler mid-value
    return (*facts_with_questions(facts + "\n" + filler, asked, windows), stated)


def load_facts_long(input, val_frac, seed, **options):
    """Facts and their questions separated by 1-16 windows (of block_size) of other people's facts and
    questions; open-set values, val's people and values never seen in training. A fraction `near` of the
    training documents has no gap (the facts corpus's layout); the rest log-uniform in `windows`. val:
    n_val documents at each of eval_windows (0: the questions follow the facts). fit: training documents
    without a gap are drawn again until they fit in one window (a curriculum's first stage, with near=1:
    every question in its facts' window). people: (low, high) people asked about per document; rivals: all
    of a document's people, distractors too, have facts about the same topics (facts_long_document)."""
    if input:
        raise DataError("facts_long is generated, not read: drop --input (use --seed for a different corpus)")
    o = longrange_options(options, block_size=FACTS_LONG_BLOCK, windows=(1.0, 16.0), near=0.25,
                         eval_windows=(0,) + LONGRANGE_EVAL_WINDOWS[1:], n_train=FACTS_LONG_TRAIN_DOCS,
                         n_val=FACTS_LONG_VAL_PER_DISTANCE, fit=False, people=(1, 2), rivals=False)
    people = o["people"]
    if not (isinstance(people, (tuple, list)) and len(people) == 2 and 1 <= people[0] <= people[1] <= 3):
        # at most 3: the filler draws 4 names and skips the asked
        raise DataError(f"people must be (low, high) with 1 <= low <= high <= 3, e.g. \"people=(2,3)\"; got {people!r}")
    rng = random.Random(seed)
    train_names = facts_train_names(FACTS_TRAIN_PEOPLE, rng)
    heldout_names = [f"{f} {l}" for f in FACTS_HELDOUT_NAMES for l in FACTS_LAST_NAMES]

    def document(names, w, heldout):
        return facts_long_document(rng, names, w, o["block_size"], heldout, people, o["rivals"])
    docs = {"train": [], "val": []}
    for _ in range(o["n_train"]):
        w = 0.0 if rng.random() < o["near"] else round(log_uniform(rng, *o["windows"]), 3)
        doc = document(train_names, w, False)
        while o["fit"] and w == 0 and len(doc[0]) > o["block_size"]:
            doc = document(train_names, w, False)
        docs["train"].append(doc[:2])
    for i in range(o["n_val"] * len(o["eval_windows"])):
        w = float(o["eval_windows"][i % len(o["eval_windows"])])
        text, record, stated = document(heldout_names, w, True)
        docs["val"].append((text, {**record, "facts": stated}))  # val only: train's would be ~60 MB
    return longrange_corpus("built-in", docs, {"task": "facts_long", "seed": seed, **o})


def longrange_corpus(source, docs, settings):
    files = {f"longrange_{s}.jsonl": "".join(json.dumps(r) + "\n" for _, r in docs[s]) for s in ("train", "val")}
    files["generator.json"] = json.dumps(settings, indent=1) + "\n"
    texts = {s: [t for t, _ in docs[s]] for s in ("train", "val")}
    return Corpus(source, TextDocs(lambda: texts["train"], len(texts["train"])),
                  TextDocs(lambda: texts["val"], len(texts["val"])), files)


# name -> (default tokenizer, loader(input, val_frac, seed) -> Corpus)
DATASETS = {
    "shakespeare_char": ("char", load_shakespeare),
    "shakespeare": ("gpt2", load_shakespeare),
    "tinystories": ("gpt2", load_tinystories),
    "openwebtext": ("gpt2", load_openwebtext),
    "text": ("gpt2", load_text),
    "facts": ("char", load_facts),
    "dialogs": ("word", load_dialogs),
    "shakespeare_plays": ("char", load_shakespeare_plays),
    "wikitext2_docs": ("char", load_wikitext2_docs),
    "passkey": ("char", load_passkey),
    "facts_open": ("char", load_facts_open),
    "facts_long": ("char", load_facts_long),
}


# -----------------------------------------------------------------------------
# writing

def write_tokens(f, pieces, separator, dtype, starts=None):
    """Append the pieces' tokens to file f, with separator between documents; returns the token count.
    Chunk by chunk: a big corpus never sits in memory whole. starts (a list) gets the offset of
    every document's first token; a document ends with the separator that follows it."""
    count = 0
    for new_doc, ids in pieces:
        if len(ids) == 0:  # an empty document adds nothing, not even a separator
            continue
        if new_doc and count:
            f.write(np.asarray(separator, dtype=dtype).tobytes())
            count += len(separator)
        if new_doc and starts is not None:
            starts.append(count)
        f.write(np.asarray(ids, dtype=dtype).tobytes())
        count += len(ids)
    return count


def prepare(name, input=None, tokenizer=None, out_dir=None, val_frac=0.1, seed=1337, options=None):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0 < val_frac < 1:
        raise DataError(f"val_frac must be between 0 and 1, got {val_frac}")
    default_tokenizer, load = DATASETS[name]
    tokenizer = tokenizer or default_tokenizer
    if options and name not in GENERATOR_OPTIONS:
        raise DataError(f"{name} takes no generator options; {', '.join(sorted(GENERATOR_OPTIONS))} do")
    corpus = load(input, val_frac, seed, **options) if options else load(input, val_frac, seed)

    if tokenizer == "char":
        chars = {"\n"}  # always encodable, as it makes the blank line between documents
        for docs in (corpus.train, corpus.val):
            for doc in docs:
                chars.update(doc)
        tok = CharTokenizer(sorted(chars))
    elif tokenizer == "word":  # every word of both splits, like the char table
        tok = WordVocab.from_texts(doc for docs in (corpus.train, corpus.val) for doc in docs)
    elif tokenizer == "gpt2":
        tok = get_tokenizer({"tokenizer": tokenizer})
    else:  # any other name is a pretrained model's own tokenizer (smollm2, a .gguf file, an HF folder)
        tok = get_tokenizer({"tokenizer": "hf", "tokenizer_name": tokenizer})
    dtype = token_dtype(tok.vocab_size)

    out_dir = Path(out_dir or Path("data") / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    freed = sum(size for _, size in remove_stale_temps(out_dir))
    if freed:
        print(f"note: removed {freed / 1e6:.1f} MB of temp files that a killed run left in {out_dir}")
    # every file is written to a temp file beside it (common.atomic_write, replace=False) and renamed into
    # place at the end (os.replace is atomic), so a crash never leaves a half-written file; the temp files
    # carry the pid, which keeps concurrent runs apart and tells the next run which are a dead run's
    temps = {}  # final file name -> temp path
    try:
        counts = {}
        for split in ("train", "val"):
            starts = []

            def write_split(f):
                counts[split] = write_tokens(f, getattr(corpus, split).pieces(tok, split), tok.separator, dtype,
                                             starts)
            temps[f"{split}.bin"] = atomic_write(out_dir / f"{split}.bin", write_split, replace=False)
            if counts[split] == 0:
                raise DataError(f"the {split} split of {name} came out empty; check --input and --val_frac")
            # document start offsets, for the document-contiguous loader
            temps[f"{split}_docs.npy"] = atomic_write(out_dir / f"{split}_docs.npy", lambda f: np.save(
                f, np.asarray(starts, dtype=np.int64)), replace=False)
        meta = {"format_version": FORMAT_VERSION, "name": name, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
                "dtype": dtype.name, "train_tokens": counts["train"], "val_tokens": counts["val"],
                "source": corpus.source}
        if tok.name == "char":
            meta["chars"] = tok.chars
        if tok.name == "word":
            meta["vocab"] = tok.to_dict()
        if tok.name == "hf":
            meta["tokenizer_name"] = tok.model_name
        meta["eot_token"] = tok.eot_token
        for file_name, text in {**corpus.extra_files, "meta.json": json.dumps(meta, indent=2) + "\n"}.items():
            temps[file_name] = atomic_write(out_dir / file_name, lambda f: f.write(text.encode("utf-8")),
                                            replace=False)
        # meta.json goes first and comes back last: if we die in between, load_meta finds no meta.json
        # rather than an old one describing new .bin files
        (out_dir / "meta.json").unlink(missing_ok=True)
        for file_name, tmp in temps.items():
            os.replace(tmp, out_dir / file_name)
    finally:  # after a failure, no temp file is left behind; after success there are none left to remove
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
    print(f"wrote {out_dir}: train {counts['train']:,} tokens, val {counts['val']:,} tokens, "
          f"{tok.name} vocab {tok.vocab_size:,} ({dtype.name})")
    return meta


GENERATOR_OPTIONS = {"passkey", "facts_long"}  # datasets whose loader takes generator settings (prepare.py --option)


def parse_options(items) -> dict:
    """["block_size=256", "windows=(1, 4)"] -> {"block_size": 256, "windows": (1, 4)} (values are Python literals)."""
    import ast
    options = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise DataError(f"--option {item!r} needs the form KEY=VALUE")
        try:
            options[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise DataError(f"--option {item!r}: {raw!r} is not a Python literal (a number, a tuple...)") from None
    return options


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=DATASETS)
    parser.add_argument("--input", help="local file or folder, instead of downloading")
    parser.add_argument("--tokenizer", help="override the dataset's default tokenizer: char, gpt2, word, or a pretrained "
                        "model's own: smollm2, a .gguf file, a Hugging Face folder or hub name")
    parser.add_argument("--out_dir", help="default: data/NAME")
    parser.add_argument("--val_frac", type=float, default=0.1, help="fraction of the text held out for val")
    parser.add_argument("--seed", type=int, default=1337, help="for the facts corpus and the openwebtext split")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a generator setting of passkey, facts_long (e.g. --option block_size=256 "
                        "--option windows=(0.5,4)); repeatable")

    def run(args):
        options = parse_options(args.option)
        del args.option
        prepare(**vars(args), options=options)

    # a DataError or Ctrl-C ends it with one line (a killed run's temp files go in prepare's finally)
    cli(run, lambda: parser.parse_args(argv), DataError)


if __name__ == "__main__":
    main()
