"""
Sample from a trained model (a train.py checkpoint) or from GPT-2 weights, optionally with a
persistent kNN attention memory, and evaluate what the memory does.

    python sample.py --out_dir=out-facts --start=$'Imogen Hale lives in Oslo.\nQ: Where does Imogen Hale live?\nA:' --num_samples=3
    python sample.py config/sample_gpt2.py --init_from=path/to/hf_folder --start=FILE:prompt.txt
    python sample.py config/sample_gpt2_type_3_method.py                      # sentiment direction
    python sample.py config/sample_facts_recall.py                            # eval='recall'
    python sample.py --out_dir=out-dialogs --mode=chat                        # chat with the seq2seq bot

Sample i is drawn with its own generator seeded seed + i, whatever batch it runs in, so
`--seed=S --num_samples=1` reproduces the sample printed with seed S on its own.

Memory settings (see knn.KNNSettings): `knn` (one k per layer), the gates and mixing of the
method's Types 1-3, the search backend; `memory_text` builds a memory (a string or FILE:path),
`memory_dir` loads one, `memory_save` writes it (load + text + save grows a memory).
Perplexity, kNN-LM and the chatbot's dialogue evaluation are evaluate.py's.
"""

import json
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

from chat import Seq2Seq, run_chat
from checkpoint import CheckpointError, load_model
from common import autocast_context, cli, pyplot, read_jsonl, resolve_device, write_eval, write_json
from configurator import ConfigError, at_least, format_config, load_config, need, one_of, within
from knn import KNNLM, KNNLMDatastore, KNNMemory, KNNMemoryError, KNNSettings
from memory import generate_any
from model import chat_prompt
from prepare import DataError
from runs import CheckedSettings, not_empty

# what sample.py stops on with one line instead of a traceback
USER_ERRORS = (ConfigError, DataError, CheckpointError, KNNMemoryError, OSError)


@dataclass
class SampleConfig(CheckedSettings):
    init_from: str = "resume"  # 'resume' (out_dir/ckpt.pt), or pretrained weights (see model.GPT.from_pretrained)
    out_dir: str = "out"
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 5
    max_new_tokens: int = 200  # with eval='recall': the M tokens in which an answer must appear
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 200
    top_p: float | None = None
    stop: str | None = None  # end a sample at this token, e.g. '<|endoftext|>' or '\n' (must be one token)
    seed: int = 1337
    batch_size: int = 8  # samples generated side by side
    use_cache: bool = True  # KV cache; False recomputes the context every token
    output_json: str | None = None  # also write every sample with its seed and these settings
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    # the kNN memory (active when knn has a k > 0)
    memory_text: str | None = None  # text to add to the memory, or FILE:path
    memory_dir: str | None = None  # load this memory folder first
    memory_save: str | None = None  # write the memory to this folder
    memory_force: bool = False  # use a memory built by other weights anyway
    # evaluation instead of plain sampling
    eval: str | None = None  # 'recall' or 'sentiment'
    eval_file: str | None = None  # recall: JSONL of {"memory", "prompt", "answers"}
    eval_items: int | None = None  # recall: only the first N items
    eval_seeds: int = 20  # seeds per item (recall) or per arm (sentiment): seed, seed + 1, ...
    eval_out: str | None = None  # folder for the JSON and the plot; default out_dir/eval_<eval>
    # sentiment: prompts and the two memory texts; arms plain, memory (+/-) and the text in the context (+/-)
    sentiment_prompts: str | None = None  # JSON file: a list of prompts, or {"tune": [...], "test": [...]}; None: start
    eval_split: str = "test"  # which list of a {"tune", "test"} prompts file
    memory_positive: str | None = None  # text (or FILE:path) of the positive memory; None: only memory_text's arm
    memory_negative: str | None = None  # text (or FILE:path) of the negative memory
    eval_context: bool = True  # sentiment: also the arms with the memory text placed in the context before the prompt
    # instruct models
    chat_template: bool = False  # wrap the prompt (recall: question, or facts + question) in the model's chat template
    suppress_eos_steps: int = 0  # the end token cannot be drawn as any of the first N new tokens
    # sampling from kNN-LM, p = lambda p_kNN + (1 - lambda) p_LM, over a datastore evaluate.py built
    knnlm_dir: str | None = None
    knnlm_lambda: float = 0.0  # 0 = off
    knnlm_k: int = 64  # neighbours
    knnlm_temperature: float = 1.0  # p_kNN = softmax(-squared distance / temperature)
    # the seq2seq chatbot (a checkpoint of train.py task='dialog')
    mode: str = "sample"  # 'sample' or 'chat'
    chat_script: str | None = None  # replay these user lines (one per line; /save, /load, /reset, /quit work)
    chat_load: str | None = None  # start from this saved conversation (PATH.safetensors + PATH.json)
    chat_save: str | None = None  # save the conversation here at the end
    vocab_capacity: int | None = None  # at most this many words: those added while chatting go LRU first

    def validate(self):
        """Every setting in its allowed range, before any work (temperature=-1 would sample the inverted
        distribution, top_k=0 or batch_size=0 fail deep inside)."""
        super().validate()
        not_empty(self, "start", "stop", "output_json", "memory_text", "memory_dir", "memory_save", "chat_script",
                  "chat_load", "chat_save")
        at_least(self, 0, "temperature")
        at_least(self, 1, "num_samples", "max_new_tokens", "top_k", "eval_seeds")
        need(self.top_p is None or 0 < self.top_p <= 1,
             f"top_p={self.top_p!r} is out of range: top_p must be in (0, 1] (or None: off)")
        within(self, 0, 1, "knnlm_lambda")
        one_of(self, "mode", ("sample", "chat"))
        need(self.eval in (None, "recall", "sentiment"), f"eval={self.eval!r} is not allowed: eval must be None, "
             "'recall' or 'sentiment' (perplexity, kNN-LM and dialogue evaluations are evaluate.py's)")


def read_text(value: str) -> str:
    """A setting that holds text or FILE:path (a UTF-8 text file)."""
    if value.startswith("FILE:"):
        path = value[len("FILE:"):]
        if not os.path.isfile(path):
            problem = "is a folder, not a text file" if os.path.isdir(path) else "not found"
            raise ConfigError(f"file {path} {problem} ({value!r}): give an existing text file after FILE:")
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as e:
            raise ConfigError(f"file {path} ({value!r}) is not UTF-8 text (binary? {e.reason} at byte {e.start}): "
                              "give a text file after FILE:") from None
    return value



def encode_stop(tokenizer, stop: str | None) -> int | None:
    if stop is None:
        return None
    ids = tokenizer.encode(stop)
    if len(ids) != 1:
        raise ConfigError(f"stop={stop!r} is {len(ids)} tokens for this tokenizer; it must be exactly one")
    return ids[0]


def end_token(tokenizer) -> list[int]:
    """The end-of-text token, for suppress_eos_steps."""
    end = getattr(tokenizer, "eot_token", None)
    if end is None:
        raise ConfigError("suppress_eos_steps > 0 needs a tokenizer with an end token (eot_token); this one has none")
    return [end]


def setup_memory(cfg: SampleConfig, model, tokenizer, meta) -> KNNMemory | None:
    """Load, grow and save the kNN memory as the settings say, and attach it. None when off."""
    settings = KNNSettings.from_config(cfg)
    if not settings.layers:
        if cfg.memory_text or cfg.memory_dir or cfg.memory_save:
            raise ConfigError("memory_text/memory_dir/memory_save need a memory: set knn, one k per layer")
        return None
    if cfg.memory_dir and (os.path.isdir(cfg.memory_dir) or os.path.isdir(cfg.memory_dir + ".old")):
        memory = KNNMemory.load(cfg.memory_dir, model, settings, force=cfg.memory_force)
        print(f"loaded memory {cfg.memory_dir}: {len(memory):,} entries from {len(memory.documents)} document(s)")
    elif cfg.memory_dir:
        raise ConfigError(f"memory_dir {cfg.memory_dir} does not exist: build it with memory_text=... memory_save=...")
    else:
        memory = KNNMemory.create(model, settings, meta, tokenizer)
    if cfg.memory_text:
        source = cfg.memory_text[len("FILE:"):] if cfg.memory_text.startswith("FILE:") else "memory_text"
        memory.add_text(model, tokenizer, read_text(cfg.memory_text), source=source)
        print(f"memory: {len(memory):,} entries at layers {memory.layers}")
    if cfg.memory_save:
        memory.save(cfg.memory_save)
        print(f"saved memory to {cfg.memory_save}")
    memory.attach(model)
    return memory


def generate(model, prompt_ids: list[int], seeds: list[int], cfg: SampleConfig, stop_token=None,
             device="cpu", dtype="float32", suppress_tokens=None) -> list[list[int]]:
    """The new tokens of one sample per seed, batch_size rows at a time, each row with its own
    generator (so a sample does not depend on its batch). suppress_tokens cannot be drawn as any of
    the first cfg.suppress_eos_steps new tokens."""
    ctx = autocast_context(device, dtype)
    out = []
    for first in range(0, len(seeds), cfg.batch_size):
        batch_seeds = seeds[first:first + cfg.batch_size]
        generators = [torch.Generator(device=device).manual_seed(s) for s in batch_seeds]
        x = torch.tensor([prompt_ids] * len(batch_seeds), dtype=torch.long, device=device)  # (B, T)
        with torch.no_grad(), ctx:
            y = generate_any(model, x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                             top_p=cfg.top_p, stop_token=stop_token, generators=generators,
                             use_cache=cfg.use_cache, suppress_tokens=suppress_tokens,
                             suppress_steps=cfg.suppress_eos_steps)
        for row in y.tolist():
            new = row[len(prompt_ids):]
            if stop_token is not None and stop_token in new:
                new = new[:new.index(stop_token) + 1]
            out.append(new)
    return out


def one_line(text: str, width: int = 80) -> str:
    """A sample as one printed line (its repr: newlines show as \\n), cut at width characters."""
    return repr(text if len(text) <= width else text[:width - 3] + "...")


SHOWN_ITEMS = 3  # recall: items printed with what each arm answered


def contains_word(text: str, answer: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(answer) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


BOOKKEEPING = "\n"  # every evaluation prompt starts with the bookkeeping token, as the memory's windows do


def model_prompt(cfg, tokenizer, text: str) -> str:
    """text as the model gets it: after the bookkeeping token, inside the chat template when chat_template."""
    if cfg.chat_template:
        try:
            text = chat_prompt(tokenizer, text)
        except ValueError as e:
            raise ConfigError(f"chat_template=True: {e}") from None
    return BOOKKEEPING + text


def eval_recall(cfg, model, tokenizer, memory, gen_kwargs) -> tuple[dict, object]:
    """Three arms per item, the same seeds in each: the question alone, the memory text placed
    in the context before it, and the question with the memory holding the text. Items may carry
    an "attribute" (what is asked: city, pet, ...): hit rates are also given per attribute."""
    if not cfg.eval_file:
        raise ConfigError("eval='recall' needs eval_file: a JSONL of {\"memory\", \"prompt\", \"answers\"}")
    if memory is None:
        raise ConfigError("eval='recall' needs a memory: set knn, one k per layer")
    items = read_jsonl(cfg.eval_file, {"memory": str, "prompt": str, "answers": list}, "recall items",
                       "a recall file is made by python prepare.py facts (data/facts/recall.jsonl)",
                       lambda item: None if item["answers"] and all(isinstance(a, str) for a in item["answers"])
                       else '"answers" is not a non-empty list of strings')
    items = items[:cfg.eval_items] if cfg.eval_items else items
    seeds = [cfg.seed + i for i in range(cfg.eval_seeds)]
    arms = ("none", "context", "memory")
    results = []
    from tqdm import tqdm
    for item in tqdm(items, desc="recall", disable=None):
        question = model_prompt(cfg, tokenizer, item["prompt"])
        prompts = {"none": question, "context": model_prompt(cfg, tokenizer, item["memory"] + "\n" + item["prompt"]),
                   "memory": question}
        row = {"prompt": item["prompt"], "answers": item["answers"], "memory": item["memory"],
               "attribute": item.get("attribute")}
        for arm in arms:
            if arm == "memory":
                memory.clear()
                memory.add_text(model, tokenizer, item["memory"], source="eval item")
                memory.attach(model)
            else:
                KNNMemory.detach(model)
            texts = [tokenizer.decode(t) for t in generate(model, tokenizer.encode(prompts[arm]), seeds, cfg,
                                                          **gen_kwargs)]
            hits = [any(contains_word(t, a) for a in item["answers"]) for t in texts]
            row[arm] = sum(hits) / len(hits)
            row[f"{arm}_samples"] = texts
        if len(results) < SHOWN_ITEMS:  # a few items side by side, so the numbers have faces
            tqdm.write(f"{item['prompt']!r} -> {item['answers'][0]}\n" + "".join(
                f"  {arm:>8}: {one_line(row[f'{arm}_samples'][0])}\n" for arm in arms))
        results.append(row)
    summary = {arm: sum(r[arm] for r in results) / len(results) for arm in arms}
    summary["memory_over_context"] = summary["memory"] / summary["context"] if summary["context"] else None
    by_attribute = {}
    for attr in sorted({r["attribute"] for r in results if r["attribute"] is not None}):
        rows = [r for r in results if r["attribute"] == attr]
        by_attribute[attr] = {"items": len(rows), **{arm: sum(r[arm] for r in rows) / len(rows) for arm in arms}}
    for arm in arms:
        print(f"{arm:>8}: hit rate {summary[arm]:.3f} over {len(results)} items x {len(seeds)} seeds")
    for attr, rates in by_attribute.items():
        print(f"  {attr:>8} ({rates['items']} items): " + ", ".join(f"{arm} {rates[arm]:.3f}" for arm in arms))
    plt = pyplot()
    groups = ["all"] + list(by_attribute)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(groups) + 2), 4))
    labels = {"none": "question only", "context": "text in context", "memory": "kNN memory"}
    colors = {"none": "#999", "context": "#69c", "memory": "#c63"}
    for a, arm in enumerate(arms):
        rates, ns = [summary[arm]], [len(results)]
        for attr in by_attribute:
            rates.append(by_attribute[attr][arm])
            ns.append(by_attribute[attr]["items"])
        errs = [(p * (1 - p) / (n * len(seeds))) ** 0.5 for p, n in zip(rates, ns)]
        ax.bar([g + (a - 1) * 0.27 for g in range(len(groups))], rates, width=0.27, yerr=errs, capsize=3,
               color=colors[arm], label=labels[arm])
    ax.set_xticks(range(len(groups)), [f"{g}\n({len(results) if g == 'all' else by_attribute[g]['items']})"
                                       for g in groups])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"hit rate (answer in first {cfg.max_new_tokens} tokens)")
    ax.set_title(f"recall: {len(results)} items x {len(seeds)} seeds")
    ax.legend(fontsize=8)
    return {"summary": summary, "by_attribute": by_attribute, "seeds": seeds, "items": results}, fig


def sentiment_prompts(cfg) -> list[str]:
    """The prompts of a sentiment evaluation, as the model gets them: sentiment_prompts' list (its
    eval_split when it holds {"tune": [...], "test": [...]}) after the bookkeeping token, or start."""
    if not cfg.sentiment_prompts:
        return [read_text(cfg.start)]
    try:
        with open(cfg.sentiment_prompts) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"sentiment_prompts {cfg.sentiment_prompts} cannot be read ({type(e).__name__}: {e}): "
                          "give a JSON list of prompts, or {\"tune\": [...], \"test\": [...]}") from None
    if isinstance(data, dict):
        if cfg.eval_split not in data:
            raise ConfigError(f"{cfg.sentiment_prompts} has no {cfg.eval_split!r} prompts (it has {sorted(data)})")
        data = data[cfg.eval_split]
    if not data or not all(isinstance(p, str) for p in data):
        raise ConfigError(f"{cfg.sentiment_prompts}: expected a non-empty list of prompt strings")
    return [BOOKKEEPING + p for p in data]


def vader_stats(scores: list[float]) -> dict:
    t = torch.tensor(scores)
    q1, med, q3 = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75])).tolist()
    return {"median": med, "iqr": q3 - q1, "mean": t.mean().item(), "scores": scores}


def eval_sentiment(cfg, model, tokenizer, memory, gen_kwargs) -> tuple[dict, object]:
    """VADER compound score of each continuation (prompt removed), the same seeds in every arm:
    plain; the memory holding the positive / negative text; the same text in the context before
    the prompt. Per prompt: median, IQR and a one-sided Mann-Whitney U test of each arm against
    plain in the text's direction. Without memory_positive/memory_negative, one arm "memory" with
    the memory as set up (memory_text / memory_dir), tested two-sided."""
    if memory is None:
        raise ConfigError("eval='sentiment' needs a memory: set knn and memory_text or memory_dir "
                          "(or memory_positive / memory_negative)")
    from scipy.stats import mannwhitneyu
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    vader = SentimentIntensityAnalyzer()
    prompts = sentiment_prompts(cfg)
    seeds = [cfg.seed + i for i in range(cfg.eval_seeds)]
    # direction -> (memory, text); None: the memory as setup_memory left it
    memories = {}
    for direction, value in (("positive", cfg.memory_positive), ("negative", cfg.memory_negative)):
        if value:
            mem = KNNMemory.create(model, memory.settings, memory.tokenizer, tokenizer)
            mem.add_text(model, tokenizer, read_text(value), source=value[5:] if value.startswith("FILE:") else direction)
            memories[direction] = (mem, read_text(value))
    if not memories:
        memories[None] = (memory, None)
    arms = ["plain"]
    for direction, (_, text) in memories.items():
        arms.append("memory" if direction is None else f"memory_{direction}")
        if direction is not None and cfg.eval_context:
            arms.append(f"context_{direction}")
    results = []
    for p, prompt in enumerate(prompts):
        row = {"prompt": prompt, "arms": {}, "tests": {}}
        for arm in arms:
            direction = arm.split("_")[1] if "_" in arm else None
            text = prompt
            if arm.startswith("memory"):
                memories[direction][0].attach(model)
            else:
                KNNMemory.detach(model)
                if arm.startswith("context"):
                    text = BOOKKEEPING + memories[direction][1] + "\n\n" + prompt.lstrip("\n")
            if cfg.chat_template:
                text = model_prompt(cfg, tokenizer, text.lstrip("\n"))
            samples = [tokenizer.decode(t) for t in generate(model, tokenizer.encode(text), seeds, cfg, **gen_kwargs)]
            row["arms"][arm] = {**vader_stats([vader.polarity_scores(t)["compound"] for t in samples]),
                                "samples": samples}
            if arm != "plain":
                alternative = {"positive": "greater", "negative": "less", None: "two-sided"}[direction]
                u = mannwhitneyu(row["arms"][arm]["scores"], row["arms"]["plain"]["scores"], alternative=alternative)
                row["tests"][arm] = {"U": float(u.statistic), "p": float(u.pvalue), "alternative": alternative}
            st = row["arms"][arm]
            pv = f", p {row['tests'][arm]['p']:.2g}" if arm in row["tests"] else ""
            print(f"prompt {p} {arm:>16}: median {st['median']:+.3f}, IQR {st['iqr']:.3f}, mean {st['mean']:+.3f}{pv}"
                  f"   e.g. {one_line(samples[0])}")
        KNNMemory.detach(model)
        results.append(row)
    summary = {arm: {"median_of_medians": float(np.median([r["arms"][arm]["median"] for r in results])),
                     **({"significant_at_0.01": sum(r["tests"][arm]["p"] < 0.01 for r in results)}
                        if arm != "plain" else {})}
               for arm in arms}
    for arm in arms[1:]:
        print(f"{arm:>16}: p < 0.01 on {summary[arm]['significant_at_0.01']} of {len(results)} prompts")
    plt = pyplot()
    cols = min(3, len(results))
    rows = (len(results) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * len(arms) * cols + 1, 3.6 * rows), squeeze=False)
    colors = {"plain": "#999", "memory": "#c63", "memory_positive": "#2a2", "memory_negative": "#c22",
              "context_positive": "#9d9", "context_negative": "#e99"}
    for ax, (p, row) in zip(axes.flat, enumerate(results)):
        box = ax.boxplot([row["arms"][a]["scores"] for a in arms], patch_artist=True)
        for patch, arm in zip(box["boxes"], arms):
            patch.set_facecolor(colors[arm])
        ax.set_xticks(range(1, len(arms) + 1), [a.replace("_", "\n") for a in arms], fontsize=7)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(f"{p}: {row['prompt'].strip()[:40]}...", fontsize=8)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    axes[0][0].set_ylabel("VADER compound of the continuation")
    fig.suptitle(f"sentiment: {len(results)} prompts x {len(seeds)} seeds per arm", fontsize=9)
    result = {"summary": summary, "prompts": results, "seeds": seeds}
    if len(results) == 1:
        result["arms"] = results[0]["arms"]
    return result, fig


def run_chat_mode(cfg, model, vocab, source):
    """What sample.py does with a seq2seq chatbot: chat (mode='chat'); the transcript is written to
    output_json however the chat ends."""
    if cfg.mode != "chat" or cfg.eval:
        raise ConfigError(f"{source} is a seq2seq chatbot: use mode='chat' (its evaluation is evaluate.py "
                          "eval='dialog')")
    transcript = []
    try:
        return run_chat(cfg, model, vocab, source, transcript)
    finally:
        if cfg.output_json:
            write_json(cfg.output_json, {"settings": asdict(cfg), "model": source, "transcript": transcript})


def main(cfg: SampleConfig):
    """Plain sampling returns [{'seed', 'text', 'completion', 'tokens'}]; eval=... returns the
    evaluation's results (also written as JSON and a PNG to eval_out)."""
    cfg.validate()  # load_config ran it already; a SampleConfig built in code gets it here
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    print(f"settings:\n{format_config(cfg)}")
    model, tokenizer, meta, source = load_model(cfg.init_from, cfg.out_dir, device)
    if isinstance(model, Seq2Seq):
        return run_chat_mode(cfg, model, tokenizer, source)
    if cfg.mode == "chat":
        raise ConfigError(f"mode='chat' needs a seq2seq chatbot (train.py task='dialog'); {source} is a GPT")
    memory = setup_memory(cfg, model, tokenizer, meta)
    if cfg.compile:
        model = torch.compile(model)
    gen_kwargs = dict(stop_token=encode_stop(tokenizer, cfg.stop), device=device, dtype=dtype,
                      suppress_tokens=end_token(tokenizer) if cfg.suppress_eos_steps > 0 else None)
    if cfg.knnlm_lambda > 0 and cfg.eval is None:  # sample from lambda p_kNN + (1 - lambda) p_LM
        if not cfg.knnlm_dir:
            raise ConfigError("knnlm_lambda > 0 needs knnlm_dir: a datastore folder (evaluate.py eval='knnlm' builds one)")
        store = KNNLMDatastore.open_or_build(cfg.knnlm_dir, model, KNNSettings.from_config(cfg), meta,
                                             force=cfg.memory_force)
        KNNLM(store, cfg.knnlm_lambda, cfg.knnlm_k, cfg.knnlm_temperature).attach(model)

    if cfg.eval:
        evaluate = {"recall": eval_recall, "sentiment": eval_sentiment}[cfg.eval]
        return write_eval(cfg, source, *evaluate(cfg, model, tokenizer, memory, gen_kwargs))

    prompt = read_text(cfg.start)
    if cfg.chat_template:
        prompt = model_prompt(cfg, tokenizer, prompt)[len(BOOKKEEPING):]
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ConfigError("the prompt is empty: set start to some text (e.g. --start='\\n')")
    seeds = [cfg.seed + i for i in range(cfg.num_samples)]
    samples = []
    for seed, new in zip(seeds, generate(model, prompt_ids, seeds, cfg, **gen_kwargs)):
        completion = tokenizer.decode(new)
        samples.append({"seed": seed, "text": prompt + completion, "completion": completion, "tokens": new})
        print(f"--- sample {seed - cfg.seed} (seed {seed}) ---")
        print(prompt + completion)
    if cfg.output_json:
        write_json(cfg.output_json, {"settings": asdict(cfg), "model": source, "prompt": prompt, "samples": samples})
        print(f"wrote {len(samples)} samples to {cfg.output_json}")
    return samples


if __name__ == "__main__":
    cli(main, lambda: load_config(SampleConfig), USER_ERRORS)
