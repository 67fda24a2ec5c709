import json

import pytest
import torch

import sample
import train
from configurator import ConfigError, load_config
from conftest import tiny_train_config


@pytest.fixture(scope="module")
def trained(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    train.main(tiny_train_config(char_data, out, max_iters=30, eval_interval=30))
    return out


def sample_cfg(out_dir, **kw):
    settings = dict(out_dir=str(out_dir), device="cpu", dtype="float32", start="ROMEO:", num_samples=4,
                    max_new_tokens=24, temperature=1.0, top_k=20, seed=100)
    settings.update(kw)
    return load_config(sample.SampleConfig, [], **settings)


def test_samples_are_reproducible_and_seeded_per_sample(trained):
    a = sample.main(sample_cfg(trained, batch_size=4))
    assert [s["seed"] for s in a] == [100, 101, 102, 103]
    assert len({s["text"] for s in a}) > 1 and all(s["text"].startswith("ROMEO:") for s in a)
    assert all(len(s["tokens"]) == 24 for s in a)
    # the same settings give the same samples, batched or one at a time
    b = sample.main(sample_cfg(trained, batch_size=1))
    assert [s["text"] for s in a] == [s["text"] for s in b]
    # any sample can be reproduced alone from the seed printed with it
    alone = sample.main(sample_cfg(trained, seed=102, num_samples=1))
    assert alone[0]["text"] == a[2]["text"]


def test_cached_and_recomputed_sampling_agree(trained):
    cached = sample.main(sample_cfg(trained, temperature=0.0, num_samples=1, max_new_tokens=60))
    recomputed = sample.main(sample_cfg(trained, temperature=0.0, num_samples=1, max_new_tokens=60, use_cache=False))
    assert cached[0]["text"] == recomputed[0]["text"]  # 6 + 60 tokens: runs past block_size=32


def test_output_json_and_prompt_file(trained, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET:\n")
    out = tmp_path / "res" / "samples.json"
    samples = sample.main(sample_cfg(trained, start=f"FILE:{prompt}", output_json=str(out), num_samples=2))
    saved = json.loads(out.read_text())
    assert saved["prompt"] == "JULIET:\n"
    assert saved["settings"]["seed"] == 100 and saved["settings"]["start"] == f"FILE:{prompt}"
    assert [s["text"] for s in saved["samples"]] == [s["text"] for s in samples]


def test_stop_token_ends_samples(trained):
    samples = sample.main(sample_cfg(trained, stop="\n", max_new_tokens=200, num_samples=3))
    for s in samples:
        assert s["completion"].count("\n") <= 1
        assert len(s["tokens"]) == 200 or s["completion"].endswith("\n")
    with pytest.raises(ConfigError, match="exactly one"):
        sample.main(sample_cfg(trained, stop="ab"))


@pytest.mark.needs_data("gpt2/tiktoken_cache")
def test_sample_from_local_gpt2_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32)).save_pretrained(tmp_path)
    samples = sample.main(sample_cfg(tmp_path, init_from=str(tmp_path), start="Hello world", num_samples=2,
                                     max_new_tokens=5))
    assert all(s["text"].startswith("Hello world") and len(s["tokens"]) == 5 for s in samples)


def test_memory_build_save_load_gives_identical_samples(trained, tmp_path):
    knn = dict(knn=[5, 5], bookkeeping_frac=0.0, mem_frac=5.0, resid_only=True, knn_softmax_influence=1000.0)
    text = "JULIET: my love is the sun and the stars, and mine the moon."
    built = sample.main(sample_cfg(trained, start="\nROMEO:", memory_text=text, memory_save=str(tmp_path / "m"),
                                   num_samples=3, **knn))
    loaded = sample.main(sample_cfg(trained, start="\nROMEO:", memory_dir=str(tmp_path / "m"), num_samples=3, **knn))
    assert [s["text"] for s in built] == [s["text"] for s in loaded]
    # the loaded memory acts on the model (logits: a barely trained model's samples hardly move)
    cfg = sample_cfg(trained, memory_dir=str(tmp_path / "m"), **knn)
    model, tok, meta, _ = sample.load_model("resume", str(trained), "cpu")
    idx = torch.tensor([tok.encode("\nROMEO: what")])
    with torch.no_grad():
        plain = model(idx, targets=idx)[0]
        sample.setup_memory(cfg, model, tok, meta)
        assert (model(idx, targets=idx)[0] - plain).abs().max() > 0.1
    # grow: load, add a text, save; the folder now has both documents
    sample.main(sample_cfg(trained, start="\nROMEO:", memory_dir=str(tmp_path / "m"), memory_text="FOOL: nuncle!",
                           memory_save=str(tmp_path / "m"), num_samples=1, **knn))
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert [d["text"] for d in manifest["documents"]] == [text, "FOOL: nuncle!"]
    with pytest.raises(ConfigError, match="need a memory"):
        sample.main(sample_cfg(trained, memory_text="x"))
    with pytest.raises(ConfigError, match="does not exist"):
        sample.main(sample_cfg(trained, memory_dir=str(tmp_path / "nope"), **knn))


def test_recall_eval_writes_json_and_plot(trained, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(x) for x in [
        {"memory": "ROMEO: the sun is Juliet.", "prompt": "ROMEO: the sun is", "answers": ["Juliet"]},
        {"memory": "KING: the crown is gold.", "prompt": "KING: the crown is", "answers": ["gold", "golden"]},
    ]) + "\n")
    cfg = sample_cfg(trained, eval="recall", eval_file=str(items), eval_seeds=3, max_new_tokens=12,
                     eval_out=str(tmp_path / "ev"), knn=[0, 5], bookkeeping_frac=0.0, mem_frac=5.0)
    result = sample.main(cfg)
    saved = json.loads((tmp_path / "ev" / "recall.json").read_text())
    assert saved["seeds"] == [100, 101, 102] and len(saved["items"]) == 2
    for arm in ("none", "context", "memory"):
        assert 0.0 <= saved["summary"][arm] <= 1.0 and len(saved["items"][0][f"{arm}_samples"]) == 3
        # the rate is the share of samples containing an accepted answer as a word
        for item in saved["items"]:
            hits = [any(sample.contains_word(t, a) for a in item["answers"]) for t in item[f"{arm}_samples"]]
            assert item[arm] == sum(hits) / 3
    assert (tmp_path / "ev" / "recall.png").stat().st_size > 1000
    assert sample.main(cfg)["summary"] == result["summary"]  # reproducible


def test_recall_distractors_fill_the_memory_and_the_context_alike(trained, tmp_path, monkeypatch):
    facts = [f"ROMEO: the {w} is Juliet." for w in ("sun", "moon", "star", "sky")]
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"memory": f, "prompt": "ROMEO: the", "answers": ["Juliet"]}) + "\n"
                             for f in facts))
    seen = {"context": [], "memory": []}
    real_generate, real_add = sample.generate, sample.KNNMemory.add_text
    monkeypatch.setattr(sample, "generate", lambda model, ids, *a, **k: seen["context"].append(ids)
                        or real_generate(model, ids, *a, **k))
    monkeypatch.setattr(sample.KNNMemory, "add_text", lambda self, model, tok, text, **k: seen["memory"].append(text)
                        or real_add(self, model, tok, text, **k))
    cfg = sample_cfg(trained, eval="recall", eval_file=str(items), eval_seeds=1, max_new_tokens=2,
                     eval_out=str(tmp_path / "ev"), knn=[0, 5], recall_distractors=2)
    result = sample.main(cfg)
    assert [r["distractors"] for r in result["items"]] == [2] * 4
    _, tok, _, _ = sample.load_model("resume", str(trained), "cpu")
    for i, fact in enumerate(facts):
        remembered = seen["memory"][3 * i:3 * i + 3]  # the item's own text among 2 others, in the memory...
        assert fact in remembered and len(set(remembered)) == 3 and set(remembered) <= set(facts)
        context = tok.decode(seen["context"][3 * i + 1])  # ...and in the same order in the context arm
        assert context == "\n" + "\n".join(remembered) + "\nROMEO: the"
    with pytest.raises(ConfigError, match="recall_distractors=4 needs that many other items"):
        sample.main(sample_cfg(trained, eval="recall", eval_file=str(items), knn=[0, 5], recall_distractors=4))


def test_contains_word():
    assert sample.contains_word("A: Oslo\nQ:", "oslo")
    assert not sample.contains_word("A: Oslofjord", "Oslo")


def test_sentiment_eval_writes_json_and_plot(trained, tmp_path):
    cfg = sample_cfg(trained, eval="sentiment", start="\nROMEO:", eval_seeds=4, max_new_tokens=20,
                     eval_out=str(tmp_path / "ev"), knn=[0, 5], bookkeeping_frac=0.0, mem_frac=5.0,
                     memory_text="good, great, lovely, happy, wonderful, joy, love")
    result = sample.main(cfg)
    saved = json.loads((tmp_path / "ev" / "sentiment.json").read_text())
    assert saved["arms"] == result["arms"]
    for arm in ("plain", "memory"):
        scores = saved["arms"][arm]["scores"]
        assert len(scores) == 4 and all(-1 <= x <= 1 for x in scores)
        assert saved["arms"][arm]["median"] == pytest.approx(sorted(scores)[1] / 2 + sorted(scores)[2] / 2)
    assert saved["seeds"] == [100, 101, 102, 103]
    assert (tmp_path / "ev" / "sentiment.png").stat().st_size > 1000


@pytest.mark.needs_data("gpt2/tiktoken_cache")
@pytest.mark.parametrize("method", [1, 2, 3])
def test_gpt2_method_configs_run_end_to_end(method, tmp_path, monkeypatch):
    """The shipped GPT-2 configs, on a random-weight 12-layer stand-in for the real weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from conftest import ROOT
    monkeypatch.chdir(ROOT)
    GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=2, n_embd=16, n_positions=256)).save_pretrained(tmp_path / "hf")
    cfg = load_config(sample.SampleConfig, [f"config/sample_gpt2_type_{method}_method.py"], init_from=str(tmp_path / "hf"),
                      eval_seeds=2, max_new_tokens=4, eval_items=2, eval_out=str(tmp_path / "ev"), device="cpu")
    sample.main(cfg)
    saved = json.loads((tmp_path / "ev" / f"{cfg.eval}.json").read_text())
    assert saved["settings"]["knn"] == cfg.knn and saved["seeds"] == [cfg.seed, cfg.seed + 1]
