"""Evaluation (MLFM.md, Evaluation protocol), ``mlfm eval`` (``cli``): the runner (ranks, per-prompt seeds,
gathering, results), the tasks (``tasks``), GSM8K scoring (``gsm8k``), MT-Bench answer files for an external judge
(``mtbench``), the causal-LM judge of generative perplexity (``genppl``), the lm-eval adapter (``harness``); and
the text helpers they share."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from mlfm_scale.errors import UserError

BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "data_prep" / "benchmarks"  # the tasks' data


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """``text`` up to the earliest of the ``stop`` strings."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, parsed value)`` for each non-blank line of JSONL file ``path``; a missing file or a line
    that is not JSON is a UserError naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
