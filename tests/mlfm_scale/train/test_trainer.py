"""The Trainer under faults (tests/mlfm_scale/train/test_training.py has its normal runs): non-finite steps on
every layout, rollback to the last good checkpoint, the LR schedule's horizon across a resume, and a failed
run's last line."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from mlfm_scale.train.engine import lr_factor
from mlfm_scale.train.universal import KINDS, CheckpointReader
from tests.conftest import REPO
from tests.mlfm_scale.conftest import PIPELINE
from tests.mlfm_scale.train.test_training import BASE, metrics, samples, train

pytestmark = pytest.mark.multiprocess
LR, WARMUP = 3e-4, 2


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("nproc, layout", [
    (2, ()),  # ZeRO-3 over two data-parallel ranks
    (2, ("parallel.tp=2",)),
    (1, ("train.dtype=bf16",)),
    (2, ("parallel.pp=2", *PIPELINE)),
], ids=["zero3-dp2", "tp2", "bf16", "pp2-zero1"])
def test_a_non_finite_step_is_skipped_on_every_layout(shards, tmp_path, nproc, layout):
    """Step 3's loss is NaN (so are its gradients): weights, AdamW moments and EMA after it equal those after
    step 2 bitwise, and the LR schedule stays keyed on the step count."""
    train(tmp_path, shards, nproc, *layout, "train.steps=4", "train.inject_nonfinite=[3]", "checkpoint.every=1",
          "checkpoint.keep_last=4", f"train.lr={LR}", f"train.warmup_steps={WARMUP}")
    before, after = (CheckpointReader(tmp_path / "checkpoints" / f"step0000000{s}").read() for s in (2, 3))
    for kind in KINDS:
        for name, tensor in before[kind].items():
            assert torch.equal(tensor, after[kind][name]), (kind, name)
    step4 = CheckpointReader(tmp_path / "checkpoints" / "step00000004").read()
    assert any(not torch.equal(t, after["param"][n]) for n, t in step4["param"].items())  # step 4 trained again
    logged = {r["step"]: r for r in rows(tmp_path) if "lr" in r}
    assert math.isnan(logged[3]["loss"]) and logged[3]["skipped"] == 1 and logged[4]["skipped"] == 1
    for step in (2, 3, 4):  # the LR after step s is the schedule's at s, skipped step or not
        assert logged[step]["lr"] == pytest.approx(LR * lr_factor(step, WARMUP, 4, 0.1), rel=1e-12)


def test_repeated_non_finite_steps_roll_back_and_the_data_moves_past_them(dp2_run, shards, tmp_path):
    """Steps 5 and 6 non-finite (train.max_bad_steps=2): the run rolls back to step 4, the last good checkpoint,
    and trains steps 5-8 again on the batches after the offending ones."""
    result = train(tmp_path, shards, 2, "train.inject_nonfinite=[5,6]", "train.max_bad_steps=2", "checkpoint.every=2")
    assert f"rolled back to {tmp_path / 'checkpoints' / 'step00000004'}" in result.stderr
    logged = rows(tmp_path)
    assert {"step": 4, "rolled_back_from": 6} in logged
    losses, _ = metrics(tmp_path)
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    reference = {r["step"]: r["block_ids"] for r in samples(dp2_run, 0)}
    trained = samples(tmp_path, 0)  # every batch this rank trained on, in order, the abandoned ones too
    assert [r["step"] for r in trained] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
    assert trained[4]["block_ids"] == reference[5]  # the offending batches ...
    assert [r["block_ids"] for r in trained[6:8]] == [reference[7], reference[8]]  # ... are not trained again
    assert json.loads((tmp_path / "checkpoints" / "step00000008" / "checkpoint.json").read_text())["good"]


def test_a_run_out_of_rollbacks_ends_with_our_error_as_its_last_line(shards, tmp_path):
    """After train.max_rollbacks the run stops naming the last good checkpoint; under `--nproc` that message,
    not torchrun's traceback, is the last line."""
    cmd = [sys.executable, "-m", "mlfm_scale.cli", "train", "configs/tiny.yaml", "--nproc", "2", f"out_dir={tmp_path}",
           f"data.root={shards}", *BASE,
           "train.inject_nonfinite=[3,4,5,6]", "train.max_bad_steps=2", "train.max_rollbacks=1", "checkpoint.every=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mlfm train: error: 2 non-finite steps in a row at step 6 after 1 rollback(s)"), last
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / 'step00000004'}" in last


def test_the_lr_schedule_keeps_its_horizon_across_a_resume_unless_told(shards, tmp_path):
    """Trained with train.steps=4, resumed with train.steps=6: the schedule's horizon stays 4 (the LR stays at
    its floor) unless train.schedule_steps moves it, which is logged. wandb (offline) continues the same run."""
    first = tmp_path / "first"
    common = ("train.warmup_steps=2", f"train.lr={LR}", "checkpoint.every=4", "log.wandb=true",
              'launch.setup=["export WANDB_API_KEY=sekrit123"]')
    train(first, shards, 1, "train.steps=4", *common)
    kept, moved = tmp_path / "kept", tmp_path / "moved"
    for out, extra in ((kept, ()), (moved, ("train.schedule_steps=6",))):
        shutil.copytree(first, out)
        result = train(out, shards, 1, "train.steps=6", "train.resume=auto", *common, *extra)
    lr = {o: {r["step"]: r["lr"] for r in rows(o) if "lr" in r} for o in (kept, moved)}
    assert lr[kept][5] == lr[kept][6] == pytest.approx(LR * 0.1, rel=1e-12)
    assert lr[moved][5] == pytest.approx(LR * lr_factor(5, WARMUP, 6, 0.1), rel=1e-12) and lr[moved][5] > LR * 0.1
    assert "horizon moves from 4 to 6 steps" in result.stderr and {"step": 4, "schedule_steps": 6} in rows(moved)
    runs = {p.name.rsplit("-", 1)[-1] for p in (moved / "wandb").glob("offline-run-*")}
    assert len(runs) == 1  # one wandb run id across the resume
    stored = [f for f in (moved / "checkpoints").rglob("*") if f.is_file()]  # the config copies are redacted
    assert stored and not any(b"sekrit123" in f.read_bytes() for f in stored)
    assert any(b"export WANDB_API_KEY=<redacted>" in f.read_bytes() for f in stored)


def start(out, shards, *overrides):
    """`mlfm train` on 2 processes under torchrun, in the background; its ranks carry a tag in their environment."""
    tag = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mlfm_scale.cli",
           "train", "configs/tiny.yaml", f"out_dir={out}", f"data.root={shards}", *BASE, *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "MLFM_TEST_RUN": tag}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, tag


def rank_pid(tag, rank):
    """The pid of rank ``rank`` of the run tagged ``tag`` (None until it started)."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"MLFM_TEST_RUN={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def wait_for(condition, timeout=300, poll=0.001):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)
    return found


def logged_steps(out):
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line] \
        if path.is_file() else []


@pytest.mark.parametrize("moment", ["mid-step", "mid-save"])
def test_a_rank_killed_mid_step_or_mid_save_resumes_exactly(dp2_run, shards, tmp_path, moment):
    """SIGKILL of rank 1 while it trains step 6, or while it writes the step-4 checkpoint: torchrun tears the run
    down, and train.resume=auto continues from the newest complete checkpoint; the losses after it equal the
    uninterrupted run's bitwise, and metrics.jsonl has each step once."""
    proc, tag = start(tmp_path, shards)
    ckpt = tmp_path / "checkpoints"
    if moment == "mid-step":
        wait_for(lambda: 5 in logged_steps(tmp_path), poll=0.01)
    else:
        wait_for(lambda: (ckpt / "step00000004.tmp").is_dir())
    os.kill(wait_for(lambda: rank_pid(tag, 1)), signal.SIGKILL)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, output[-3000:]
    complete = [p.name for p in ckpt.glob("step*") if (p / "checkpoint.json").is_file()] if ckpt.is_dir() else []
    assert "step00000008" not in complete
    train(tmp_path, shards, 2, "train.resume=auto")
    losses, _ = metrics(tmp_path)
    reference, _ = metrics(dp2_run)
    assert logged_steps(tmp_path) == sorted(set(logged_steps(tmp_path)))  # no step logged twice
    assert losses == reference  # CPU fp32: bitwise


def test_a_second_writer_on_a_running_out_dir_is_refused(shards, tmp_path):
    proc, tag = start(tmp_path, shards, "train.steps=100000")
    try:
        wait_for(lambda: logged_steps(tmp_path), poll=0.1)
        second = train(tmp_path, shards, 1, "train.resume=auto", check=False)
        assert second.returncode != 0
        assert f"{tmp_path} is in use by another run" in second.stderr and "UserError" not in second.stderr
        assert proc.poll() is None  # the first run trains on
    finally:
        proc.kill()  # its ranks die with it (parallel/lifeline.py)
        proc.communicate()
    wait_for(lambda: rank_pid(tag, 0) is None and rank_pid(tag, 1) is None, timeout=60, poll=0.5)
