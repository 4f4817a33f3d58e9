"""The job's status file: written whole or not at all, read back only when it is a status."""
import json

import pytest

from launchers import status


def test_write_then_read(tmp_path):
    status.write(tmp_path, "RUNNING", job_id="5", restarts=0)
    status.write(tmp_path, "COMPLETED", job_id="5", restarts=0)
    info = status.read(tmp_path)
    assert info["state"] == "COMPLETED" and info["job_id"] == "5" and "time" in info
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary file left


def test_a_failed_write_keeps_the_previous_status(tmp_path, monkeypatch):
    status.write(tmp_path, "RUNNING")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken)
    with pytest.raises(OSError):
        status.write(tmp_path, "COMPLETED")
    assert status.read(tmp_path)["state"] == "RUNNING" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("text", ["", "[1]", '{"state": "EXPLODED"}', "\x80"])
def test_anything_but_a_status_reads_as_none(tmp_path, text):
    (tmp_path / "status.json").write_bytes(text.encode("latin-1"))
    assert status.read(tmp_path) is None
    assert status.read(tmp_path / "missing") is None
