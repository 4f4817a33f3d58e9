"""Stop requests: a signal sets the flag; the ranks agree at the step boundary."""
import os
import signal

import pytest
import torch

from mlfm_scale.train.preemption import StopRequest
from tests.distributed import run_distributed


def _signal_one_rank(signalled: int) -> tuple[bool, bool, bool]:
    import torch.distributed as dist

    stop = StopRequest()
    before = stop.agreed(torch.device("cpu"))
    if dist.get_rank() == signalled:
        with stop.installed(signal.SIGUSR2):
            os.kill(os.getpid(), signal.SIGUSR2)
    return before, stop.requested, stop.agreed(torch.device("cpu"))


@pytest.mark.multiprocess
def test_a_signal_on_one_rank_stops_every_rank():
    assert run_distributed(_signal_one_rank, 2, 1) == [(False, False, True), (False, True, True)]


def test_installed_routes_the_signal_and_restores_the_handler():
    stop = StopRequest()
    previous = signal.getsignal(signal.SIGUSR2)
    with stop.installed(signal.SIGUSR2):
        assert signal.getsignal(signal.SIGUSR2) == stop.request
        os.kill(os.getpid(), signal.SIGUSR2)
    assert stop.requested and stop.signal == "SIGUSR2" and stop.agreed(torch.device("cpu"))
    assert signal.getsignal(signal.SIGUSR2) == previous
