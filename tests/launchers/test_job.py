"""The job's side of preemption (a stopped run requeues itself at most ``launch.max_requeues`` times) and the
status file it keeps in its job folder for ``mlfm jobs``."""
import json
import os

import pytest

from launchers.job import Job, OutOfRequeues
from launchers.kinds import KINDS, JobKind
from mlfm_scale.config import Config
from mlfm_scale.errors import UserError

STOPPED = {"state": {"step": 17}, "last_checkpoint": "/runs/x/checkpoints/step00000017", "preempted": True}


def test_out_of_requeues_fails_naming_the_checkpoint(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with pytest.raises(OutOfRequeues, match=r"job 77 stopped at step 17 \(/runs/x/checkpoints/step00000017\) after 2 "
                                            r"requeues \(launch.max_requeues=2\); launch it again to resume"):
        Job("pretrain", {}, max_requeues=2)._requeue(STOPPED, restarts=2, rank=1, report=print)


def test_only_rank_zero_requeues(monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("PATH", "/nonexistent")  # rank 0 would run scontrol here and fail
    reports = []
    Job("pretrain", {}, max_requeues=2)._requeue(STOPPED, restarts=1, rank=1, report=reports.append)
    assert capsys.readouterr().out == "" and reports == []
    with pytest.raises(UserError, match=r"job 77 stopped at step 17 with checkpoint /runs/x/checkpoints/step00000017, "
                                        r"but `scontrol requeue 77` failed .*; launch it again to resume"):
        Job("pretrain", {}, max_requeues=2)._requeue(STOPPED, restarts=1, rank=0, report=reports.append)
    assert reports == ["REQUEUED"]  # before scontrol, which ends the job


# Entry points of the stand-in kinds below: each reports the status it found while running.
def status_now() -> dict:
    return json.loads((job_folder() / "status.json").read_text())


def job_folder():
    from pathlib import Path

    return Path(os.environ["SUBMITIT_FOLDER"].replace("%j", os.environ["SLURM_JOB_ID"]))


def finishes(cfg):
    return {"seen": status_now()}


def fails(cfg):
    raise RuntimeError("export WANDB_API_KEY=sekrit123 was refused")


def stops(cfg, stop):
    return STOPPED | {"seen": status_now()}


@pytest.fixture
def task(tmp_path, monkeypatch):
    """A task of SLURM job 77 (submitit's environment, rendezvous stubbed) whose kinds are the stand-ins above."""
    (tmp_path / "77").mkdir()
    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(tmp_path / "%j"), "SLURM_JOB_ID": "77",
                        "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("launchers.rendezvous.from_slurm", dict)
    for name, preemptible in (("finishes", False), ("fails", False), ("stops", True)):
        monkeypatch.setitem(KINDS, name, JobKind(name, f"{__name__}:{name}", name, preemptible=preemptible))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return lambda kind: Job(kind, Config().model_dump(mode="json"), max_requeues=3)


def test_a_job_reports_running_then_completed(task):
    summary = task("finishes")()
    assert summary["seen"]["state"] == "RUNNING" and summary["seen"]["restarts"] == 1
    assert status_now()["state"] == "COMPLETED" and status_now()["job_id"] == "77"


def test_a_failing_task_reports_the_error_redacted(task, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")  # any rank may fail first
    with pytest.raises(RuntimeError):
        task("fails")()
    status = status_now()
    assert status["state"] == "FAILED" and status["rank"] == 1
    assert status["error"] == "RuntimeError: export WANDB_API_KEY=<redacted> was refused"


def test_a_preempted_job_reports_requeued_not_completed(task):
    assert task("stops")()["seen"]["state"] == "RUNNING"
    assert status_now()["state"] == "REQUEUED"


def test_a_job_out_of_requeues_reports_failed(task, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(OutOfRequeues):
        task("stops")()
    assert status_now()["state"] == "FAILED" and status_now()["error"].startswith("OutOfRequeues: job 77 stopped")
