"""The job's side of preemption: a stopped run may requeue itself at most ``launch.max_requeues`` times."""
import pytest

from launchers.job import Job, OutOfRequeues
from mlfm_scale.errors import UserError

STOPPED = {"state": {"step": 17}, "last_checkpoint": "/runs/x/checkpoints/step00000017", "preempted": True}


def test_out_of_requeues_fails_naming_the_checkpoint(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with pytest.raises(OutOfRequeues, match=r"job 77 stopped at step 17 \(/runs/x/checkpoints/step00000017\) after 2 "
                                            r"requeues \(launch.max_requeues=2\); launch it again to resume"):
        Job("pretrain", {}, max_requeues=2)._requeue(STOPPED, restarts=2, rank=1)


def test_only_rank_zero_requeues(monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("PATH", "/nonexistent")  # rank 0 would run scontrol here and fail
    Job("pretrain", {}, max_requeues=2)._requeue(STOPPED, restarts=1, rank=1)
    assert capsys.readouterr().out == ""
    with pytest.raises(UserError, match=r"job 77 stopped at step 17 with checkpoint /runs/x/checkpoints/step00000017, "
                                        r"but `scontrol requeue 77` failed .*; launch it again to resume"):
        Job("pretrain", {}, max_requeues=2)._requeue(STOPPED, restarts=1, rank=0)
