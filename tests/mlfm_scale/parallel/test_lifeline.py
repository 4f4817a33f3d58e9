"""Ranks cannot outlive their run: a rank dies with its torchrun agent (killed before or after the rank joined
its process group), and a rank whose peer died or hangs leaves its collective after the configured timeout."""
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import psutil
import pytest

from mlfm_scale.errors import UserError
from mlfm_scale.parallel.lifeline import TIMEOUT_ENV, collective_timeout, die_with_launcher
from tests.conftest import REPO, SMALL_MODEL

# A stand-in for torchrun: starts a "rank" that asks to die with it, says the rank's pid, and waits.
LAUNCHER = """
import subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
print(rank.pid, flush=True)
rank.wait()
"""
RANK = """
import sys, time
from pathlib import Path
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
from mlfm_scale.parallel.lifeline import die_with_launcher
die_with_launcher()
print("armed", flush=True)
time.sleep(600)
"""


def gone(pid: int, seconds: float) -> bool:
    try:
        psutil.Process(pid).wait(seconds)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher_dies", ["after", "before"])
def test_a_rank_dies_with_its_launcher(tmp_path, launcher_dies):
    """The launcher SIGKILLed after the rank asked (the kernel kills the rank) or before (the rank, adopted by
    init, exits when it asks)."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, str(tmp_path / "go")], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, env={**os.environ, "TORCHELASTIC_RUN_ID": "test"})
    rank = int(launcher.stdout.readline())
    try:
        if launcher_dies == "after":
            (tmp_path / "go").touch()
            assert launcher.stdout.readline().strip() == "armed"
        launcher.kill()
        launcher.wait()
        (tmp_path / "go").touch()
        assert gone(rank, 60)
    finally:
        if not gone(rank, 0):
            os.kill(rank, signal.SIGKILL)


def test_without_torchrun_nothing_is_asked(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert die_with_launcher() is False


def test_the_collective_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout() == timedelta(minutes=10)
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert collective_timeout() == timedelta(seconds=2.5)
    for bad in ("0", "-1", "ten"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(UserError, match=f"{TIMEOUT_ENV}='{bad}'"):
            collective_timeout()


# ------------------------------------------------------------------------ real ranks (multi-process, slow)
# Trains "forever" (one log line per step) so that a rank left running would still be running at the deadline.
FOREVER = [*SMALL_MODEL, "train.steps=100000", "train.micro_batch_size=4", "train.warmup_steps=2",
           "train.eval_every=100000", "train.eval_batches=1", "log.every=1", "log.plot_every=100000",
           "checkpoint.every=100000"]


def agent_and_ranks(parent: subprocess.Popen, timeout: float) -> tuple[psutil.Process, list[psutil.Process]]:
    """The torchrun agent that ``mlfm train --nproc 2`` started, and its two ranks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert parent.poll() is None, "mlfm train --nproc ended early"
        try:
            agents = [c for c in psutil.Process(parent.pid).children()
                      if "torch.distributed.run" in " ".join(c.cmdline())]
            ranks = [c for c in agents[0].children() if "mlfm_scale.cli" in " ".join(c.cmdline())] if agents else []
        except psutil.NoSuchProcess:
            ranks = []
        if len(ranks) == 2:
            return agents[0], ranks
        time.sleep(0.05)
    pytest.fail(f"no torchrun agent with two ranks after {timeout} s")


def trained_a_step(out) -> bool:
    try:
        return '"loss"' in (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.multiprocess
@pytest.mark.parametrize("when", ["starting", "training"])
def test_ranks_die_when_their_torchrun_agent_is_killed(shards, tmp_path, when):
    """SIGKILL of the agent of ``mlfm train --nproc 2`` while its ranks start (importing: they exit on reaching
    the process group, so the bound covers the imports on a busy machine) or train (the kernel kills them)."""
    out = tmp_path / "run"
    with open(tmp_path / "train.log", "w") as log:
        parent = subprocess.Popen([sys.executable, "-m", "mlfm_scale.cli", "train", "configs/tiny.yaml", "--nproc",
                                   "2", f"out_dir={out}", f"data.root={shards}", *FOREVER], cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT)
    ranks = []
    try:
        agent, ranks = agent_and_ranks(parent, 300)
        if when == "training":
            deadline = time.monotonic() + 600
            while not trained_a_step(out):
                assert time.monotonic() < deadline, (tmp_path / "train.log").read_text()[-3000:]
                time.sleep(0.2)
        agent.kill()
        bound = 30 if when == "training" else 300
        alive = [r.pid for r in psutil.wait_procs(ranks, timeout=bound)[1]]
        assert not alive, f"ranks {alive} still run {bound} s after their agent was killed"
    finally:
        for process in [*ranks, psutil.Process(parent.pid)]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        parent.wait()


PEER = """
import time
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from mlfm_scale.config import ParallelSection
from mlfm_scale.parallel.state import init_distributed, init_model_parallel
init_distributed(torch.device("cpu"))
init_model_parallel(ParallelSection(tp=1, pp=1), seed=0)
print("ready", flush=True)
ones = torch.ones(1)
while True:  # megatron's data-parallel group: where ZeRO's collectives run
    dist.all_reduce(ones, group=parallel_state.get_data_parallel_group())
    time.sleep(0.01)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("peer_fate", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_rank_whose_peer_dies_or_hangs_leaves_its_collective(tmp_path, peer_fate):
    """Two ranks all-reducing with MLFM_COLLECTIVE_TIMEOUT_S=5: rank 1 SIGKILLed (gloo sees the connection close)
    or SIGSTOPped (nothing to see: only the timeout ends the wait); rank 0 fails out of its collective."""
    from tests.distributed import free_port

    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), TIMEOUT_ENV: "5", "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"rank{r}.err", "w") for r in range(2)]
    ranks = [subprocess.Popen([sys.executable, "-c", PEER], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=logs[r], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    try:
        for r in ranks:
            assert r.stdout.readline().strip() == "ready", (tmp_path / "rank0.err").read_text()[-3000:]
        time.sleep(1)
        ranks[1].send_signal(peer_fate)
        started = time.monotonic()
        code = ranks[0].wait(timeout=60)
        assert code != 0 and time.monotonic() - started < 5 + 25  # the timeout, plus exiting on a busy machine
        if peer_fate == signal.SIGSTOP:
            assert "Timed out waiting 5000ms" in (tmp_path / "rank0.err").read_text()
    finally:
        for r, log in zip(ranks, logs):
            r.kill()
            r.wait()
            log.close()
