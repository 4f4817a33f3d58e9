"""Crash-safe writes: fsync helpers, atomic file replacement, and a directory swap that a crash at any step
leaves with the old or the new version complete."""
import os
import signal
import subprocess
import sys

import pytest

from mlfm_scale import durable
from mlfm_scale.durable import atomic_write_text, fsync_dir, fsync_file, fsync_tree, publish_dir, recover_dir, staging


def write_tree(root, **files):
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)


def test_fsync_helpers_accept_files_directories_and_trees(tmp_path):
    write_tree(tmp_path / "t" / "sub", a="1")
    (tmp_path / "t" / "b").write_text("2")
    fsync_file(tmp_path / "t" / "b")
    fsync_dir(tmp_path / "t")
    fsync_tree(tmp_path / "t")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "t" / "b")


def test_atomic_write_text_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest"
    atomic_write_text(path, "step1")
    atomic_write_text(path, "step2")
    assert path.read_text() == "step2" and os.listdir(tmp_path) == ["latest"]


def test_atomic_write_text_killed_midway_keeps_the_old_content(tmp_path):
    """SIGKILL between writing the temporary and renaming it: the file still holds the old text."""
    path = tmp_path / "latest"
    atomic_write_text(path, "old")
    script = ("import os, signal, sys\nfrom mlfm_scale import durable\n"
              "durable.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
              "durable.atomic_write_text(sys.argv[1], 'new' * 1000)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(path)])
    assert proc.returncode == -signal.SIGKILL
    assert path.read_text() == "old"


def test_publish_dir_replaces_a_directory(tmp_path):
    target = tmp_path / "export"
    assert staging(target) == tmp_path / "export.tmp"
    write_tree(staging(target), first="1")
    publish_dir(target)  # nothing to replace
    write_tree(staging(target), second="2")
    publish_dir(target)
    assert os.listdir(target) == ["second"] and sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_crash_during_the_swap_leaves_a_complete_version_that_recover_restores(tmp_path, monkeypatch, crash_at):
    """Crash at the first rename (old → aside) or the second (staged → target): the old version survives, the
    staged one is complete, and recover_dir puts the old one back in place and removes the rest."""
    target, staged = tmp_path / "export", staging(tmp_path / "export")
    write_tree(target, weights="old")
    write_tree(staged, weights="new")
    calls = []
    rename = os.rename

    def crashing(src, dst):
        calls.append(src)
        if len(calls) == crash_at:
            raise KeyboardInterrupt  # stands for the process dying here
        rename(src, dst)

    monkeypatch.setattr(durable.os, "rename", crashing)
    with pytest.raises(KeyboardInterrupt):
        publish_dir(target)
    monkeypatch.setattr(durable.os, "rename", rename)
    survivor = target if crash_at == 1 else tmp_path / "export.old"
    assert (survivor / "weights").read_text() == "old" and (staged / "weights").read_text() == "new"
    done = recover_dir(target)
    assert len(done) == (1 if crash_at == 1 else 2), done
    assert (target / "weights").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["export"]


def test_recover_dir_removes_a_leftover_aside_when_the_new_version_is_in_place(tmp_path):
    write_tree(tmp_path / "export", weights="new")
    write_tree(tmp_path / "export.old", weights="old")
    assert recover_dir(tmp_path / "export") == [f"removed {tmp_path / 'export.old'}, left by an interrupted "
                                                f"replacement of {tmp_path / 'export'}"]
    assert sorted(os.listdir(tmp_path)) == ["export"] and recover_dir(tmp_path / "export") == []
