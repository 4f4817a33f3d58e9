"""Stop requests: a signal (SLURM's USR2 before the time limit, or ``scancel --signal=USR2``) asks the loop to stop.

SLURM preemption itself sends SIGTERM, then SIGKILL after the grace time; that is not caught here (a plain
``scancel`` sends it too), so a preempted run resumes from its last periodic checkpoint.

Saving from inside a signal handler could start a collective while another is in flight, so the handler
only sets a flag. The loop asks :meth:`StopRequest.agreed` at each step boundary; the ranks agree with one
all-reduce (any rank signalled → all stop at the same step), save a checkpoint and return ``preempted``.
Whoever launched the run (``launchers/``) then requeues it, and the requeued run resumes from ``latest``.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


class StopRequest:
    """A flag set by a signal handler (or :meth:`request`) and read at step boundaries."""

    def __init__(self):
        self.requested = False
        self.signal: str | None = None

    def request(self, signum: int | None = None, frame=None) -> None:
        """Ask the run to stop at the next step boundary; usable as a signal handler."""
        self.requested = True
        self.signal = signal.Signals(signum).name if signum is not None else "request"

    @contextmanager
    def installed(self, *signums: int) -> Iterator[StopRequest]:
        """Route ``signums`` to :meth:`request` for the duration of the block (previous handlers restored)."""
        previous = {s: signal.signal(s, self.request) for s in signums}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self, device: torch.device) -> bool:
        """Collective over the default group: True on every rank when any rank was asked to stop."""
        flag = torch.tensor([int(self.requested)], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
