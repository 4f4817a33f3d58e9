"""Ranks that cannot outlive their run: a rank dies with the torchrun agent that started it, and a collective
whose peer died or hangs fails after a bounded time instead of waiting forever.

Without the first, SIGKILL of the agent (an OOM kill, ``kill -9``) leaves its ranks running,
blocked in their rendezvous or training on to the end with nobody to collect them. Without the second, a rank
whose peer vanished waits in its collective for the backend's default (30 min for gloo).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from datetime import timedelta

from mlfm_scale.errors import UserError

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
TIMEOUT_ENV = "MLFM_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0


def die_with_launcher() -> bool:
    """Under torchrun on Linux: have the kernel SIGKILL this process when the agent that started it dies, and
    exit at once if it already has. Returns whether the request was made: only under torchrun, whose agent is
    known to be the parent (srun's step daemon kills its own tasks; other launchers are not covered).

    The kernel sends the signal when the thread that forked this process ends; torchrun starts its workers
    from the agent's main thread, so that is the agent's death."""
    if sys.platform != "linux" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0):
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    # the agent died before the request: init adopted this process and no signal will come (a subreaper adopting
    # it is not seen here; the agent's store is gone with the agent, so joining the group fails in bounded time)
    if os.getppid() == 1:
        sys.exit(f"rank {os.environ.get('RANK', '?')}: the torchrun agent that started it is gone; exiting")
    return True


def stop_with_parent() -> None:
    """``preexec_fn`` of the torchrun agent that ``--nproc`` starts: SIGTERM it when the ``mlfm`` process that
    started it dies, which torchrun answers by stopping its ranks."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def collective_timeout() -> timedelta:
    """How long a collective waits for its peers before it fails: ``MLFM_COLLECTIVE_TIMEOUT_S`` seconds, by
    default 10 minutes — longer than a step, a save or an evaluation. Raise it where rank 0 works alone while the
    others wait longer than that: verifying (hashing) very large checkpoints on resume, or writing a layout-free
    form on a resume that changes layout."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"{TIMEOUT_ENV}={raw!r}: give the collective timeout in seconds, a positive number")
    return timedelta(seconds=seconds)
