"""The base of every error a user can cause and fix: the CLI prints its message without a traceback."""
from __future__ import annotations

import os

# set by `--nproc` launches (train/loop.py ``run_local``): the first rank to fail writes its error here, so the
# launcher can print it last, below torchrun's own report
ERROR_FILE = "MLFM_ERROR_FILE"


class UserError(ValueError):
    """Bad input, a bad config, or an unsupported request; the message says what was wrong and what to do."""


def record_error(message: str) -> None:
    """Leave ``message`` for the launcher that started this rank (only the first failing rank's is kept)."""
    path = os.environ.get(ERROR_FILE)
    if not path:
        return
    try:
        with open(path, "x") as f:
            f.write(message)
    except FileExistsError:
        pass
