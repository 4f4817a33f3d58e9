"""GSM8K scoring (MLFM.md, Evaluation protocol): problems, the zero-shot prompt, answer extraction, accuracy.

Two answers are read from each completion. *Strict*: the first number after the last ``####`` or ``###`` marker
(the format GSM8K's solutions end with). *Flexible*: the last number anywhere. Every number, the gold ones
included, goes through :func:`normalise_number`, so ``$1,234.50``, ``\\boxed{1234.5}`` and ``1234.50`` compare
equal. A completion without a number has no answer and counts as wrong; accuracy is over all scored problems.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

from mlfm_scale.durable import atomic_write_text
from mlfm_scale.errors import UserError
from mlfm_scale.eval import BENCHMARKS, read_jsonl

GSM8K_FILE = BENCHMARKS / "gsm8k_test.jsonl"  # openai/grade-school-math's test set, 1319 problems

PROMPT_TEMPLATE = "USER:\n{question}\nASSISTANT:\n"
GOLD_MARKER = "####"  # GSM8K's solutions end with "#### <answer>"
MARKER = re.compile(r"#{3,}")  # the last run of 3+ '#' starts the strict answer
BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
DOLLAR = re.compile(r"\\?\$")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # "1,234,567" but not "3,4" (a list of two numbers)
# a minus sign only where it cannot be subtraction ("10-4" is 10 and 4); a fraction before a decimal so "6/8" is one
NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d+/\d+|\d*\.?\d+)")


@dataclass(frozen=True)
class Problem:
    """One test problem: ``index`` is its position among the file's problems, ``answer`` the gold solution text,
    ``gold`` its final answer (after ``####``) normalised."""

    index: int
    question: str
    answer: str
    gold: str


def _clean(text: str) -> str:
    """``text`` with ``\\boxed{X}`` unwrapped, dollar signs and thousands separators removed."""
    text = BOXED.sub(r"\1", text)
    text = DOLLAR.sub("", text)
    return THOUSANDS.sub("", text.replace("\u2212", "-"))  # U+2212: the typographic minus


def normalise_number(text: str) -> str | None:
    """The canonical form of the number ``text`` is, or None when it is not one number.

    Accepted around it: ``$``, ``\\boxed{}``, thousands commas, a trailing period, a trailing ``%``. The percent
    sign is dropped and the value kept (``"25%"`` → ``"25"``): GSM8K's gold answers to percentage questions are
    written without it. Canonical forms: integers without leading zeros (``"-0"`` → ``"0"``); decimals without
    trailing zeros (``"3.50"`` → ``"3.5"``, ``"4.0"`` → ``"4"``); fractions reduced (``"6/8"`` → ``"3/4"``,
    ``"8/4"`` → ``"2"``); a fraction over zero is not a number.
    """
    text = _clean(text).strip().rstrip(".%").strip()
    if not NUMBER.fullmatch(text):
        return None
    if "/" in text:
        numerator, denominator = text.removeprefix("-").split("/")
        if int(denominator) == 0:
            return None
        value = Fraction(int(numerator), int(denominator)) * (-1 if text.startswith("-") else 1)
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    value = Decimal(text)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    """The normalised numbers in ``text``, in order."""
    found = (normalise_number(m[0]) for m in NUMBER.finditer(_clean(text)))
    return [n for n in found if n is not None]


def extract_strict(completion: str) -> str | None:
    """The first number after the last ``####``/``###`` marker, normalised; None without a marker or a number
    after it."""
    markers = list(MARKER.finditer(completion))
    if not markers:
        return None
    numbers = _numbers(completion[markers[-1].end():])
    return numbers[0] if numbers else None


def extract_flexible(completion: str) -> str | None:
    """The last number in ``completion``, normalised; None when there is none."""
    numbers = _numbers(completion)
    return numbers[-1] if numbers else None


def is_correct(pred: str | None, gold: str) -> bool:
    """Whether the normalised answer ``pred`` is ``gold``: the same canonical string or the same exact value
    (``"0.75"`` and ``"3/4"``)."""
    return pred is not None and (pred == gold or Fraction(pred) == Fraction(gold))


def prompt_of(problem: Problem) -> str:
    return PROMPT_TEMPLATE.format(question=problem.question)


def load_problems(path: str | Path) -> list[Problem]:
    """The problems of a GSM8K JSONL file (``{"question": ..., "answer": "... #### N"}`` per line), in file order;
    blank lines are skipped."""
    path = Path(path)
    problems = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("question", "answer")):
            raise UserError(f"{where}: expected an object with string fields 'question' and 'answer'")
        if GOLD_MARKER not in row["answer"]:
            raise UserError(f"{where}: the answer has no '{GOLD_MARKER} <number>' final line")
        final = row["answer"].rsplit(GOLD_MARKER, 1)[1]
        gold = normalise_number(final)
        if gold is None:
            raise UserError(f"{where}: the final answer {final.strip()!r} after '{GOLD_MARKER}' is not a number")
        problems.append(Problem(len(problems), row["question"], row["answer"], gold))
    if not problems:
        raise UserError(f"{path} holds no problems")
    return problems


def read_completions(path: str | Path, n_problems: int) -> dict[int, str]:
    """Completions saved earlier (``--score-only FILE``): one ``{"index": i, "completion": "..."}`` per line, ``i``
    the problem's position in a test file of ``n_problems``; other keys are ignored."""
    path = Path(path)
    completions, seen_at = {}, {}
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict) or "index" not in row or "completion" not in row:
            raise UserError(f"{where}: expected an object with fields 'index' and 'completion'")
        index, completion = row["index"], row["completion"]
        if type(index) is not int or not isinstance(completion, str):
            raise UserError(f"{where}: 'index' must be an integer and 'completion' a string")
        if not 0 <= index < n_problems:
            raise UserError(f"{where}: index {index} is outside the test file's {n_problems} problems "
                            f"(0..{n_problems - 1}); were these completions made for another file?")
        if index in seen_at:
            raise UserError(f"{where}: index {index} already has a completion on line {seen_at[index]}")
        completions[index], seen_at[index] = completion, lineno
    return completions


def score(problems: list[Problem], completions: dict[int, str]) -> tuple[list[dict], dict]:
    """Score the problems that have a completion: one record each (in problem order) and the metrics. Accuracies
    are fractions of the scored problems; ``no_answer_*`` count the completions where no number was found."""
    unknown = sorted(completions.keys() - {p.index for p in problems})
    if unknown:
        raise UserError(f"completions for problems {unknown[:5]} that the test file does not have")
    records = []
    for p in problems:
        if p.index not in completions:
            continue
        completion = completions[p.index]
        strict, flexible = extract_strict(completion), extract_flexible(completion)
        records.append({"id": p.index, "question": p.question, "completion": completion, "strict": strict,
                        "flexible": flexible, "gold": p.gold,
                        "correct": {"strict": is_correct(strict, p.gold), "flexible": is_correct(flexible, p.gold)}})
    if not records:
        raise UserError("no completions to score")
    n = len(records)
    return records, {
        "n": n,
        "accuracy_strict": sum(r["correct"]["strict"] for r in records) / n,
        "accuracy_flexible": sum(r["correct"]["flexible"] for r in records) / n,
        "no_answer_strict": sum(r["strict"] is None for r in records),
        "no_answer_flexible": sum(r["flexible"] is None for r in records),
    }


def write_results(out_dir: str | Path, records: list[dict], metrics: dict) -> Path:
    """Write ``OUT_DIR/gsm8k/predictions.jsonl`` and ``metrics.json``, each atomically; returns that folder."""
    folder = Path(out_dir) / "gsm8k"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return folder
