"""The run lock with real processes: one of several writers starting together gets it, the others are refused
with the holder named; a killed holder, a silent one and an earlier run of a requeued SLURM job are taken over;
simultaneous takeovers admit one writer."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mlfm_scale.errors import UserError
from mlfm_scale.train.run_lock import LOCK, RunLock
from tests.conftest import REPO

# A writer: waits for `go` (so that all start within a millisecond), tries the lock, says HELD or REFUSED, holds it
# for HOLD seconds (ample for the others to try), releases it.
WRITER = """
import os, sys, time
from pathlib import Path
from mlfm_scale.errors import UserError
from mlfm_scale.train.run_lock import RunLock
out, sync, hold = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
(sync / f"ready{os.getpid()}").touch()
while not (sync / "go").exists():
    time.sleep(0.001)
try:
    lock = RunLock(out, heartbeat_s=0.2, stale_s=30).acquire()
except UserError as e:
    print("REFUSED", e, flush=True)
    sys.exit(3)
print("HELD", flush=True)
time.sleep(hold)
lock.release()
"""


def start_writers(out, sync, n, hold, env=None):
    sync.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(sync), str(hold)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
             for _ in range(n)]
    deadline = time.monotonic() + 120
    while len(list(sync.glob("ready*"))) < n:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "writers did not start"
        time.sleep(0.01)
    return procs


def race(out, sync, n, hold=1.5):
    """``n`` writers trying the lock at the same moment → [(pid, returncode, stdout, stderr)]."""
    procs = start_writers(out, sync, n, hold)
    (sync / "go").touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    return [(p.pid, p.returncode, *o) for p, o in zip(procs, outputs)]


def holder(out):
    return json.loads((out / LOCK).read_text())


def write_lock(out, **fields):
    out.mkdir(parents=True, exist_ok=True)
    now = time.time()
    record = {"host": "node7", "pid": 4321, "slurm_job_id": None, "slurm_restart_count": 0, "started": now,
              "heartbeat": now, "token": "theirs", **fields}
    (out / LOCK).write_text(json.dumps(record))


@pytest.mark.multiprocess
def test_of_writers_starting_together_one_gets_the_lock(tmp_path):
    for round in range(4):
        out = tmp_path / f"run{round}"
        results = race(out, tmp_path / f"sync{round}", 3)
        held = [r for r in results if r[1] == 0]
        assert len(held) == 1 and held[0][2].startswith("HELD"), results
        for pid, code, stdout, _ in results:
            if pid != held[0][0]:
                assert code == 3 and stdout.startswith("REFUSED") and f"pid {held[0][0]}," in stdout, stdout
        assert not (out / LOCK).exists()  # released at exit


@pytest.mark.multiprocess
def test_a_refusal_names_the_holder(tmp_path):
    out = tmp_path / "run"
    procs = start_writers(out, tmp_path / "sync", 1, 60, env={"SLURM_JOB_ID": "4242"})
    (tmp_path / "sync" / "go").touch()
    try:
        while not (out / LOCK).exists():
            time.sleep(0.01)
        time.sleep(0.5)  # a few heartbeats
        with pytest.raises(UserError) as refused:
            RunLock(out).acquire()
        message = str(refused.value)
        assert f"host {socket.gethostname()}, pid {procs[0].pid}, SLURM job 4242, last heartbeat 0 s ago" in message
        assert message.startswith(f"{out} is in use by another run") and "choose another out_dir" in message
        assert holder(out)["heartbeat"] > holder(out)["started"]  # the daemon thread refreshes it
    finally:
        procs[0].kill()
        procs[0].wait()


def test_the_heartbeat_is_refreshed_and_release_removes_the_lock(tmp_path):
    with RunLock(tmp_path, heartbeat_s=0.05, stale_s=1) as lock:
        first = holder(tmp_path)
        assert (first["host"], first["pid"]) == (socket.gethostname(), os.getpid())
        time.sleep(0.3)
        assert holder(tmp_path)["heartbeat"] > first["heartbeat"] and not lock.lost
    assert not (tmp_path / LOCK).exists()
    lock.release()  # idempotent


@pytest.mark.multiprocess
def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path, capfd):
    out = tmp_path / "run"
    procs = start_writers(out, tmp_path / "sync", 1, 60)
    (tmp_path / "sync" / "go").touch()
    while not (out / LOCK).exists():
        time.sleep(0.01)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    started = time.monotonic()
    with RunLock(out):
        assert time.monotonic() - started < 1 and holder(out)["pid"] == os.getpid()
    err = capfd.readouterr().err
    assert f"took over {out / LOCK} from host {socket.gethostname()}, pid {procs[0].pid}" in err
    assert f"process {procs[0].pid} has ended" in err


def test_a_silent_holder_is_taken_over_after_the_timeout_and_a_live_one_is_not(tmp_path, capfd):
    write_lock(tmp_path, heartbeat=time.time() - 5)  # another host: only the heartbeat tells
    with pytest.raises(UserError, match="host node7, pid 4321, SLURM job none, last heartbeat 5 s ago"):
        RunLock(tmp_path, heartbeat_s=1, stale_s=10).acquire()
    write_lock(tmp_path, heartbeat=time.time() - 11)
    with RunLock(tmp_path, heartbeat_s=1, stale_s=10):
        assert holder(tmp_path)["pid"] == os.getpid()
    assert "its last heartbeat is 11 s old (stale after 10 s)" in capfd.readouterr().err


def test_a_requeued_slurm_job_takes_over_from_its_earlier_run(tmp_path, monkeypatch, capfd):
    """Same job id and a higher SLURM_RESTART_COUNT: the earlier run is over, even with a fresh heartbeat on a
    host this process cannot inspect; another job, or the same run of this job, is refused."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(tmp_path, slurm_job_id="77", slurm_restart_count=1)
    with pytest.raises(UserError, match="SLURM job 77"):
        RunLock(tmp_path).acquire()
    write_lock(tmp_path, slurm_job_id="78")
    with pytest.raises(UserError, match="SLURM job 78"):
        RunLock(tmp_path).acquire()
    write_lock(tmp_path, slurm_job_id="77")  # restart count 0
    with RunLock(tmp_path):
        assert holder(tmp_path)["slurm_restart_count"] == 1
    assert "an earlier run of SLURM job 77 (this one is its requeue)" in capfd.readouterr().err


@pytest.mark.multiprocess
def test_of_writers_taking_over_a_stale_lock_together_one_gets_it(tmp_path):
    for round in range(3):
        out = tmp_path / f"run{round}"
        write_lock(out, heartbeat=time.time() - 600)
        results = race(out, tmp_path / f"sync{round}", 3)
        held = [r for r in results if r[1] == 0]
        assert len(held) == 1 and "took over" in held[0][3], results
        assert all(f"pid {held[0][0]}," in r[2] for r in results if r is not held[0]), results
        assert not (out / LOCK).exists() and not (out / "run.lock.takeover").exists()


def test_a_holder_taken_over_notices_and_leaves_the_new_lock(tmp_path, capfd):
    lock = RunLock(tmp_path, heartbeat_s=0.05, stale_s=1).acquire()
    write_lock(tmp_path)  # another writer judged this one stale and replaced the lock
    time.sleep(0.3)
    assert lock.lost and "was taken over by another writer (host node7, pid 4321" in capfd.readouterr().err
    lock.release()
    assert holder(tmp_path)["token"] == "theirs"
