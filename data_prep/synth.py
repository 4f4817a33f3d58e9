"""A deterministic synthetic corpus with long-range structure, and the checker that scores samples.

Each document is a "story" framed by its hero's name, with sentences whose words constrain each other at a
distance, so a sampler that factorises badly makes checkable mistakes (MLFM.md, "New York" / "San Diego"):

    Story of Mila. Mila flew from New York to San Diego. 347 plus 85 equals 432.
    The capital of France is Paris. Counting from 17 : 17 18 19 20. The end of Mila's story.

``is_valid(text)`` is true when every complete sentence of ``text`` obeys its rule (arithmetic correct,
cities whole, capital matching its country, counts consecutive, story end naming the story's hero).
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

NAMES = ("Mila", "Omar", "Ines", "Kofi", "Yuki", "Lars", "Ana", "Ravi", "Zoe", "Tomas", "Noor", "Ivan")
CITIES = ("New York", "New Delhi", "San Diego", "San Jose", "Los Angeles", "Las Vegas", "Hong Kong",
          "Buenos Aires", "Cape Town", "Tel Aviv", "Rio Grande", "Santa Fe")
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Egypt": "Cairo", "Chile": "Santiago", "India": "Delhi", "Italy": "Rome", "Ghana": "Accra"}
VERBS = ("flew", "drove", "walked", "sailed")

_SENTENCE = re.compile(r"[^.]*\.")
_RULES = {
    "start": re.compile(r"Story of (\w+)"),
    "end": re.compile(r"The end of (\w+)'s story"),
    "trip": re.compile(r"(\w+) (\w+) from (.+?) to (.+)"),
    "sum": re.compile(r"(\d+) plus (\d+) equals (\d+)"),
    "capital": re.compile(r"The capital of (\w+) is (\w+)"),
    "count": re.compile(r"Counting from (\d+) : ([\d ]+)"),
}


def _sentence(rng: random.Random, hero: str) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.sample(CITIES, 2)
        return f"{hero} {rng.choice(VERBS)} from {a} to {b}."
    if kind == 1:
        a, b = rng.randrange(10, 1000), rng.randrange(10, 1000)
        return f"{a} plus {b} equals {a + b}."
    if kind == 2:
        country = rng.choice(sorted(CAPITALS))
        return f"The capital of {country} is {CAPITALS[country]}."
    start = rng.randrange(1, 90)
    return f"Counting from {start} : {' '.join(str(start + i) for i in range(rng.randrange(3, 7)))}."


def synth_document(index: int, seed: int = 0) -> str:
    """Document ``index`` of the corpus with ``seed``; independent of every other document."""
    rng = random.Random(f"mlfm-synth:{seed}:{index}")
    hero = rng.choice(NAMES)
    body = " ".join(_sentence(rng, hero) for _ in range(rng.randrange(3, 9)))
    return f"Story of {hero}. {body} The end of {hero}'s story."


def synth_documents(count: int, seed: int = 0, start: int = 0) -> Iterator[str]:
    for i in range(start, start + count):
        yield synth_document(i, seed)


def synth_example(document: str) -> dict[str, str]:
    """A document as an SFT prompt/response pair: "Story of NAME." asks for the story that follows."""
    prompt, _, response = document.partition(". ")
    return {"prompt": prompt + ".", "response": response}


def write_synth_jsonl(path: str | Path, count: int, seed: int = 0, text_field: str = "text",
                      sft: bool = False) -> int:
    """Write ``count`` documents as JSONL (one ``{text_field: ...}`` per line, or with ``sft`` one
    ``{"prompt", "response"}`` pair); returns bytes written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for doc in synth_documents(count, seed):
            f.write(json.dumps(synth_example(doc) if sft else {text_field: doc}) + "\n")
    return path.stat().st_size


# ------------------------------------------------------------------------------------------- checker
@dataclass
class SynthCheck:
    """Counts over the complete sentences of a text; ``errors`` names each broken one."""

    sentences: int = 0
    valid: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.valid / self.sentences if self.sentences else 0.0


def _sentence_ok(sentence: str, hero: str | None) -> tuple[bool, str | None]:
    """(obeys its rule, the hero a 'Story of' sentence introduces)."""
    if m := _RULES["start"].fullmatch(sentence):
        return m[1] in NAMES, m[1]
    if m := _RULES["end"].fullmatch(sentence):
        return m[1] in NAMES and (hero is None or m[1] == hero), hero
    if m := _RULES["sum"].fullmatch(sentence):
        return int(m[1]) + int(m[2]) == int(m[3]), hero
    if m := _RULES["capital"].fullmatch(sentence):
        return CAPITALS.get(m[1]) == m[2], hero
    if m := _RULES["count"].fullmatch(sentence):
        nums = [int(n) for n in m[2].split()]
        return nums[0] == int(m[1]) and nums == list(range(nums[0], nums[0] + len(nums))), hero
    if m := _RULES["trip"].fullmatch(sentence):
        who, verb, a, b = m.groups()
        ok = who in NAMES and (hero is None or who == hero) and verb in VERBS and a in CITIES and b in CITIES
        return ok and a != b, hero
    return False, hero


def check(text: str) -> SynthCheck:
    """Score every complete sentence (ending in '.') of ``text``; a trailing fragment is ignored."""
    result, hero = SynthCheck(), None
    for raw in _SENTENCE.findall(text):
        sentence = " ".join(raw[:-1].split())
        if not sentence:
            continue
        ok, hero = _sentence_ok(sentence, hero)
        result.sentences += 1
        result.valid += ok
        if not ok:
            result.errors.append(sentence)
    return result


def is_valid(text: str) -> bool:
    """True when ``text`` has at least one complete sentence and every one obeys its rule."""
    result = check(text)
    return result.sentences > 0 and result.valid == result.sentences
