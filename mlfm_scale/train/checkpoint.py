"""Sharded checkpoints: DeepSpeed's files plus ours, verified by a manifest, published by ``latest``.

    CKPT_DIR/step00000100/   DeepSpeed model/optimizer shards, client state, rankNNNNN.pt (each rank's own state)
    CKPT_DIR/step00000100/checkpoint.json   every file with its size and sha256 (written last)
    CKPT_DIR/latest          the newest complete tag, replaced atomically after every rank finished

A save writes into ``stepNNNNNNNN.tmp`` and renames it into place when complete (durable.py ``publish_dir``), so
a re-saved tag starts empty (nothing of an earlier save, such as its layout-free form, survives) and a killed
save leaves the published checkpoints as they were (:func:`recover` tidies what it left). Files and directories
are fsynced before ``latest`` moves. A checkpoint
without ``checkpoint.json``, or whose files differ from it, is refused on load with a message naming the
file; ``latest`` never points at such a checkpoint. Retention keeps the newest ``keep_last`` and every
``keep_every``-th step.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from mlfm_scale.durable import ASIDE, STAGING, atomic_write_text, fsync_tree, publish_dir, recover_dir
from mlfm_scale.errors import UserError

MANIFEST = "checkpoint.json"
UNIVERSAL = "universal"  # a tag's layout-free form (train/reshard.py)
LATEST = "latest"
TAG = re.compile(r"^step(\d{8})$")
LEFTOVER = re.compile(rf"^(step\d{{8}})({re.escape(STAGING)}|{re.escape(ASIDE)})$")  # of a killed save


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded as it is (missing, truncated, tampered with, or incompatible)."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    m = TAG.match(tag)
    if not m:
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (stepNNNNNNNN)")
    return int(m[1])


def checked_tag(tag: str) -> str:
    """``tag`` if it is a tag name (a damaged ``latest`` may hold anything)."""
    step_of(tag)
    return tag


def tags(ckpt_dir: Path) -> list[str]:
    """The tag directories in ``ckpt_dir`` (complete or not), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG.match(p.name))


def newest_verified(ckpt_dir: Path) -> str | None:
    """The newest tag in ``ckpt_dir`` whose files match its manifest."""
    for tag in reversed(tags(ckpt_dir)):
        try:
            verify(ckpt_dir / tag)
            return tag
        except CheckpointError:
            continue
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def size(tag_dir: Path) -> int:
    """Bytes of a checkpoint's own files (not of a layout-free form written beside them)."""
    return sum(p.stat().st_size for p in tag_dir.rglob("*")
               if p.is_file() and UNIVERSAL not in p.relative_to(tag_dir).parts)


def write_manifest(tag_dir: Path, info: dict, files: dict[str, dict]) -> None:
    atomic_write_text(tag_dir / MANIFEST, json.dumps({**info, "files": files}, indent=1))


def manifest_sha256(tag_dir: Path) -> str:
    """The hash of a checkpoint's manifest: it names the checkpoint's exact files."""
    return _sha256(tag_dir / MANIFEST)


def describe(tag_dir: Path, names: list[str]) -> dict[str, dict]:
    """{name: {bytes, sha256}} for ``names`` under ``tag_dir``."""
    return {n: {"bytes": (tag_dir / n).stat().st_size, "sha256": _sha256(tag_dir / n)} for n in names}


def recover(ckpt_dir: Path) -> list[str]:
    """Tidy what killed saves left in ``ckpt_dir`` (a staged ``TAG.tmp``; a replaced ``TAG.old``, put back if
    the tag itself is missing); one line per action."""
    leftovers = {m[1] for p in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else []) if (m := LEFTOVER.match(p.name))}
    return [line for tag in sorted(leftovers) for line in recover_dir(ckpt_dir / tag)]


def _files(tag_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def verify(tag_dir: Path) -> dict:
    """The checkpoint's manifest after checking every file's size and sha256; raises CheckpointError."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{tag_dir} has no {MANIFEST}: the save did not finish (or this is not a "
                              "checkpoint); resume from another tag")
    manifest = json.loads(manifest_path.read_text())
    for name, want in manifest["files"].items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"{tag_dir}: {name} is missing; the checkpoint is incomplete")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{tag_dir}: {name} has {size} bytes, the manifest says {want['bytes']} "
                                  "(truncated?); resume from another tag")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{tag_dir}: {name} does not match its sha256 in {MANIFEST} (corrupted or "
                                  "modified); resume from another tag")
    return manifest


def latest_tag(ckpt_dir: Path) -> str | None:
    """What ``latest`` says (None if it is missing or unreadable)."""
    try:
        return (ckpt_dir / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def resolve(resume: str, what: str = "train.resume") -> tuple[Path, str]:
    """(checkpoint directory, tag) for a checkpoint path given as ``train.resume`` (or another argument, named
    ``what`` in errors): a tag directory, or a checkpoint directory holding ``latest``."""
    path = Path(resume)
    if TAG.match(path.name) and path.is_dir():
        return path.parent, path.name
    tag = latest_tag(path)
    if tag is None:
        raise CheckpointError(f"{what}={resume!r}: no checkpoint there (neither a stepNNNNNNNN directory "
                              f"nor a directory with a {LATEST!r} file)")
    return path, tag


def publish_latest(ckpt_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` (atomically, durably; rank 0)."""
    atomic_write_text(ckpt_dir / LATEST, tag)


def publish(ckpt_dir: Path, tag: str, info: dict, files: dict[str, dict], keep_last: int,
            keep_every: int | None) -> None:
    """On rank 0, after every rank saved into ``tag.tmp``: write the manifest, move the staged tag into place
    (fsynced; replacing an earlier save of it), point ``latest`` at ``tag``, apply retention.

    Retention looks only at tags up to ``tag`` (a resumed run leaves an abandoned timeline's newer tags alone):
    the newest ``keep_last`` complete ones, every ``keep_every``-th, and the newest whose steps were all good (a
    rollback's target) are kept; incomplete older ones go."""
    write_manifest(ckpt_dir / (tag + STAGING), info, files)
    publish_dir(ckpt_dir / tag)
    publish_latest(ckpt_dir, tag)
    older = [t for t in tags(ckpt_dir) if t <= tag]
    complete = [t for t in older if (ckpt_dir / t / MANIFEST).is_file()]
    keep = set(complete[-keep_last:]) | {tag}
    if keep_every:
        keep |= {t for t in complete if step_of(t) % keep_every == 0}
    good = [t for t in complete if json.loads((ckpt_dir / t / MANIFEST).read_text()).get("good", True)]
    keep |= set(good[-1:])
    for old in set(older) - keep:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, info: dict,
         keep_last: int, keep_every: int | None) -> str:
    """Collective: DeepSpeed's save, each rank's own state (``rank_state``: EMA partitions), the files hashed
    by all ranks in parallel, then rank 0 publishes."""
    import torch

    tag = tag_for(step)
    staged = ckpt_dir / (tag + STAGING)
    rank, world = dist.get_rank(), dist.get_world_size()
    on_rank0(lambda: recover_dir(ckpt_dir / tag))  # what a killed save of this tag left behind (ours by its name)
    engine.save_checkpoint(str(ckpt_dir), tag=staged.name, client_state=client_state, save_latest=False)
    torch.save(rank_state, staged / f"rank{rank:05d}.pt")
    fsync_tree(staged)  # by every rank: on a shared filesystem a file is flushed by the client that wrote it
    dist.barrier()
    names = _files(staged)
    described = [None] * world
    dist.all_gather_object(described, describe(staged, names[rank::world]))
    files = {k: v for part in described for k, v in part.items()}
    on_rank0(lambda: publish(ckpt_dir, tag, info, dict(sorted(files.items())), keep_last, keep_every))
    return tag


def on_rank0(fn) -> None:
    """Collective: run ``fn`` on rank 0 only; whatever it raises is raised on every rank (as a CheckpointError
    naming the original error), so no rank is left waiting in a later collective."""
    problem = [None]
    if dist.get_rank() == 0:
        try:
            fn()
        except UserError as e:  # CheckpointError among them: the message says it all
            problem = [str(e)]
        except Exception as e:  # noqa: BLE001 — every rank must learn of it
            problem = [f"{type(e).__name__}: {e}"]
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise CheckpointError(problem[0])


def resolve_verified(source: str, what: str, verified: Path | None = None) -> Path:
    """Collective: the tag directory ``source`` names (:func:`resolve`), its files verified on rank 0 unless it is
    ``verified`` (a tag directory this process has just verified), shared with every rank; errors on every rank."""
    found = [None]

    def choose() -> None:
        ckpt_dir, tag = resolve(source, what=what)
        tag_dir = (ckpt_dir / tag).resolve()
        if verified is None or tag_dir != verified.resolve():
            verify(tag_dir)
        found[0] = str(tag_dir)

    on_rank0(choose)
    dist.broadcast_object_list(found, src=0)
    return Path(found[0])


def load(engine, ckpt_dir: Path, tag: str, verified: bool = False) -> tuple[dict, dict, dict]:
    """Collective: (client state, this rank's own state, checkpoint info) after verifying the files on rank 0
    (unless the caller just did: ``verified``); a checkpoint of another layout is resharded for this one
    (train/reshard.py)."""
    import torch

    if not verified:
        on_rank0(lambda: verify(ckpt_dir / tag))
    info = json.loads((ckpt_dir / tag / MANIFEST).read_text())
    from mlfm_scale.train.reshard import layout_changed, load_resharded

    if layout_changed(info, engine):  # another world size, TP size or ZeRO stage: through the layout-free form
        client_state, rank_state = load_resharded(engine, ckpt_dir / tag)
        return client_state, rank_state, info
    from mlfm_scale.train.universal import load_file

    # DeepSpeed's own loader unpickles with weights_only=False: its files go through ours (weights only, plus the
    # few plain types DeepSpeed stores) instead
    engine.checkpoint_engine.load = lambda path, map_location=None: load_file(path, map_location or "cpu")
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    rank_state = torch.load(ckpt_dir / tag / f"rank{dist.get_rank():05d}.pt", weights_only=True)
    return client_state, rank_state, info
