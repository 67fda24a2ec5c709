"""Checks the recall items and sentiment prompts in this folder; exits non-zero on a problem.

    python config/smollm2/validate_items.py
"""
import json
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
ATTRIBUTES = ("city", "pet", "colour", "job", "number")
errors = []


def word(text, answer, flags=0):
    return re.search(r"(?<!\w)" + re.escape(answer) + r"(?!\w)", text, flags) is not None


files = {}
for name in ("recall_test", "recall_tune"):
    items = []
    for n, line in enumerate((HERE / f"{name}.jsonl").read_text().splitlines(), 1):
        where = f"{name}:{n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: does not parse ({e})")
            continue
        if set(item) != {"memory", "prompt", "answers", "attribute", "entity"}:
            errors.append(f"{where}: keys {sorted(item)}")
            continue
        memory, prompt, answers = item["memory"], item["prompt"], item["answers"]
        if item["attribute"] not in ATTRIBUTES:
            errors.append(f"{where}: attribute {item['attribute']!r}")
        # the question, then the start of the answer, so that the asked value is the very next word
        if not re.fullmatch(r"Question: [^\n]+\?\nAnswer: [^\n]*\S", prompt):
            errors.append(f"{where}: prompt is not 'Question: ...?\\nAnswer: <start of the answer>'")
        words = len(memory.split())
        sentences = len(re.findall(r"[.!?](?:\s|$)", memory))
        if not 20 <= words <= 60 or not 1 <= sentences <= 3:
            errors.append(f"{where}: memory has {words} words, {sentences} sentences")
        if item["entity"] not in memory or item["entity"] not in prompt:
            errors.append(f"{where}: entity {item['entity']!r} not in both memory and prompt")
        if not answers or not all(isinstance(a, str) and a for a in answers):
            errors.append(f"{where}: answers {answers!r}")
        for a in answers:
            if not word(memory, a):  # verbatim, case-sensitive, whole word
                errors.append(f"{where}: answer {a!r} not in memory")
            if word(prompt, a, re.IGNORECASE):  # sample.py matches case-insensitively
                errors.append(f"{where}: answer {a!r} in prompt")
        items.append(item)
    files[name] = items
    print(f"{name}: {len(items)} items, {dict(Counter(i['attribute'] for i in items))}")

all_items = [i for items in files.values() for i in items]
for entity, count in Counter(i["entity"] for i in all_items).items():
    if count > 1:
        errors.append(f"entity {entity!r} used {count} times")
# first and last names apart too, so no two people are easily confused
parts = Counter(p for i in all_items for p in i["entity"].split())
errors += [f"name part {p!r} used {c} times" for p, c in parts.items() if c > 1]
# every asked value is used once, so tune and test share no values either
for answer, count in Counter(a.lower() for i in all_items for a in i["answers"]).items():
    if count > 1:
        errors.append(f"answer {answer!r} asked {count} times")
# no item's answer appears anywhere in another item (as a distractor)
for i in all_items:
    for j in all_items:
        if i is not j:
            for a in i["answers"]:
                if word(j["memory"] + " " + j["prompt"], a, re.IGNORECASE):
                    errors.append(f"answer {a!r} of {i['entity']} appears in the item about {j['entity']}")

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # noqa: E402
vader = SentimentIntensityAnalyzer()
prompts = json.loads((HERE / "sentiment_prompts.json").read_text())
if set(prompts) != {"tune", "test"} or len(prompts["tune"]) != 4 or len(prompts["test"]) != 6:
    errors.append("sentiment_prompts.json: want {'tune': 4 prompts, 'test': 6 prompts}")
for split, texts in prompts.items():
    for text in texts:
        c = vader.polarity_scores(text)["compound"]
        words = len(text.split())
        print(f"{split:>5} {c:+.3f} {words:2d}w {text}")
        if abs(c) >= 0.3 or not 8 <= words <= 20:
            errors.append(f"prompt {text!r}: compound {c:+.3f}, {words} words")
for name, sign in (("memory_positive.txt", 1), ("memory_negative.txt", -1)):
    text = (HERE / name).read_text()
    scores = vader.polarity_scores(text)
    words = len(text.split())
    print(f"{name}: {words} words, {scores}")
    if sign * scores["compound"] < 0.95 or not 150 <= words <= 250:
        errors.append(f"{name}: compound {scores['compound']:+.4f}, {words} words")

print("\n".join(errors) or "all checks pass")
sys.exit(1 if errors else 0)
