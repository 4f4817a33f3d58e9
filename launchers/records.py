"""The project's job index: one JSON line per submitted job (``runs/jobs.jsonl`` in this checkout, or
``$MLFM_JOBS_INDEX``), read by ``mlfm jobs``. SLURM forgets finished jobs; this does not."""
from __future__ import annotations

import json
import os
from pathlib import Path

from launchers.options import REPO


def index_path() -> Path:
    return Path(os.environ.get("MLFM_JOBS_INDEX") or REPO / "runs" / "jobs.jsonl")


def append(record: dict) -> None:
    path = index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read() -> list[dict]:
    path = index_path()
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
