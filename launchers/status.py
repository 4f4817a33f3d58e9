"""A job's own account of how it went: ``status.json`` in its job folder, written by the job (``launchers.job``)
when it starts, finishes, fails or requeues, and read by ``mlfm jobs`` once SLURM no longer lists the job (SLURM
accounting may be off). JSON rather than submitit's result pickle: loading a pickle runs whatever code its
writer chose.

    {"state": "FAILED", "time": "2025-01-01T12:00:00", "job_id": "31", "restarts": 1, "rank": 3,
     "error": "OutOfRequeues: ..."}
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

FILE = "status.json"
STATES = ("RUNNING", "COMPLETED", "FAILED", "REQUEUED")


def write(folder: Path, state: str, **details) -> None:
    """Replace ``folder/status.json``: a temporary file beside it, on disk before it is renamed over the old
    one, so a reader (or a crash) sees the previous status or this one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".status-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **details}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, Path(folder) / FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(folder: Path) -> dict | None:
    """The status in ``folder``, or None when there is none or the file is not a status."""
    try:
        info = json.loads((Path(folder) / FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("state") in STATES else None
