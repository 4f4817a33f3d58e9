"""Crash-safe writes: fsync a file, a directory or a tree; replace a file or a whole directory atomically.

A rename is atomic but not durable until its directory is fsynced, and a renamed file's bytes are not durable
until the file is; after a power loss or a killed writer every helper here leaves the old version or the new
one complete, never a mix. A staged directory lives beside its target (``TARGET.tmp``), so the final rename
never crosses a filesystem.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

STAGING, ASIDE = ".tmp", ".old"  # TARGET.tmp: being written; TARGET.old: the replaced version, being removed


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data and metadata to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush ``path``'s entries (names created, renamed or removed in it) to the device."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under ``root``, and ``root`` itself (files before their directory)."""
    for parent, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(os.path.join(parent, name))
        fsync_dir(parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers and crashes see the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{STAGING}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def staging(target: Path) -> Path:
    """``TARGET.tmp``: where the next version of directory ``target`` is written (after :func:`recover_dir`) before
    :func:`publish_dir`."""
    return target.with_name(target.name + STAGING)


def recover_dir(target: Path) -> list[str]:
    """Finish what a crash in :func:`publish_dir` or in a writer left beside ``target``: a complete old version
    renamed aside (``TARGET.old``) goes back when ``target`` is missing and is removed otherwise, and a
    partial ``TARGET.tmp`` is removed. Returns one line per action, for the caller to report."""
    done = []
    staged, aside = staging(target), target.with_name(target.name + ASIDE)
    if aside.exists():
        if target.exists():
            shutil.rmtree(aside)
            done.append(f"removed {aside}, left by an interrupted replacement of {target}")
        else:
            os.rename(aside, target)
            fsync_dir(target.parent)
            done.append(f"restored {target} from {aside}, left by an interrupted replacement")
    if staged.exists():
        shutil.rmtree(staged)
        done.append(f"removed {staged}, left by an interrupted write")
    return done


def publish_dir(target: Path) -> None:
    """Make the complete directory ``staging(target)`` ``target``, replacing what is there: every staged file is
    fsynced, an existing ``target`` is renamed to ``TARGET.old``, the staged one renamed to ``target``, the
    parent fsynced, then ``TARGET.old`` removed. A crash at any point leaves the old or the new version complete;
    between the two renames the old one is at ``TARGET.old`` (``target`` itself is missing for that instant)
    and :func:`recover_dir` puts it back."""
    staged, aside = staging(target), target.with_name(target.name + ASIDE)
    fsync_tree(staged)
    if target.exists():
        os.rename(target, aside)
    os.rename(staged, target)
    fsync_dir(target.parent)
    if aside.exists():
        shutil.rmtree(aside)
