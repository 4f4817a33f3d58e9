"""`mlfm jobs`: an ended job's outcome comes from the JSON status the job wrote, never from a pickle."""
import argparse
import json
import pickle

import pytest

from launchers import jobs_cli


class CreatesAFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.fixture
def job(tmp_path, monkeypatch):
    """Job 31 in the index, its folder, and a SLURM that no longer lists it."""
    folder = tmp_path / "run" / "slurm" / "31"
    folder.mkdir(parents=True)
    record = {"job_id": "31", "kind": "pretrain", "name": "x", "out_dir": str(tmp_path / "run"),
              "checkpoints": str(tmp_path / "run" / "checkpoints"), "folder": str(folder), "nodes": 2,
              "tasks_per_node": 1, "after": [], "submitted": "2025-01-01T00:00:00"}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.setenv("MLFM_JOBS_INDEX", str(tmp_path / "jobs.jsonl"))
    monkeypatch.setattr(jobs_cli.slurm, "queue_states", dict)
    return folder


def row(capsys) -> list[str]:
    jobs_cli.run(argparse.Namespace(last=20))
    return capsys.readouterr().out.splitlines()[1].split()


def test_a_result_pickle_in_the_job_folder_is_never_unpickled(job, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    (job / "31_0_result.pkl").write_bytes(pickle.dumps(("success", CreatesAFileWhenUnpickled(marker))))
    (job / "status.json").write_text(json.dumps({"state": "FAILED", "error": "OutOfRequeues: job 31 stopped"}))
    assert row(capsys)[:5] == ["31", "pretrain", "x", "FAILED", "OutOfRequeues"]
    assert not marker.exists()


@pytest.mark.parametrize("status, state, reason", [
    ({"state": "COMPLETED"}, "COMPLETED", "2"),  # no reason: the NODES column follows
    ({"state": "FAILED", "error": "RuntimeError: boom"}, "FAILED", "RuntimeError"),
    ({"state": "RUNNING"}, "UNKNOWN", "EndedUnreported"),  # killed, out of memory, node lost
    ("{not json", "UNKNOWN", "NoStatusFile"), ({"state": "rm -rf"}, "UNKNOWN", "NoStatusFile"),
    (None, "UNKNOWN", "NoStatusFile"),
], ids=["completed", "failed", "silent-end", "corrupt", "bad-state", "missing"])
def test_an_ended_job_state_comes_from_its_status_file(job, capsys, status, state, reason):
    if status is not None:
        (job / "status.json").write_text(status if isinstance(status, str) else json.dumps(status))
    assert row(capsys)[3:5] == [state, reason]
