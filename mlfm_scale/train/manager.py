"""One registry of a run's resumable state.

Each stateful piece of a run (counters, data loader, γ curve, RNG, decision profile, metrics position and wandb
id, EMA) registers once with the :class:`CheckpointManager`; the manager saves, loads, verifies and (through
train/reshard.py, which copies the whole registry) reshards all of them. A new piece of state is one
``register`` call. In the checkpoint the registry is DeepSpeed's client state::

    {"components": {name: state_dict}, "manifest_sha256": shards' hash, "config": the run's config (redacted)}

and ``rankNNNNN.pt`` holds the per-rank components (EMA partitions).
"""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from mlfm_scale.train import checkpoint

# before the registry, checkpoints held these components at the top level of the client state (name there → name)
LEGACY_COMPONENTS = {"state": "counters", "loader": "loader", "objective": "objective", "rng": "rng",
                     "decision": "decision"}


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def components(client: dict) -> dict[str, Any]:
    """The registered components' states in a checkpoint's client state (either format)."""
    if "components" in client:
        return client["components"]
    return {name: client.get(key) for key, name in LEGACY_COMPONENTS.items()}


class RngState:
    """The process-wide torch / numpy / python generators (the per-step draws are seeded, these are not)."""

    def state_dict(self) -> dict:
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])


class Record:
    """A dict kept in every checkpoint (e.g. where a run's initial weights came from)."""

    def __init__(self):
        self.value: dict = {}

    def state_dict(self) -> dict:
        return dict(self.value)

    def load_state_dict(self, state: dict) -> None:
        self.value = dict(state)


class CheckpointManager:
    """Saves and restores every registered component with the engine's weights and optimizer state.

    ``shared`` components are saved in DeepSpeed's client state (their state may differ between
    model-parallel ranks, e.g. a pipeline stage that reads no data has no loader); ``per_rank`` ones in each
    rank's ``rankNNNNN.pt``."""

    def __init__(self, engine, ckpt_dir: Path, data_hash: str, config: dict, keep_last: int,
                 keep_every: int | None):
        self.engine, self.ckpt_dir, self.data_hash, self.config = engine, ckpt_dir, data_hash, config
        self.keep_last, self.keep_every = keep_last, keep_every
        self.shared: dict[str, Stateful] = {}
        self.per_rank: dict[str, Stateful] = {}

    def register(self, name: str, component: Stateful | None, per_rank: bool = False) -> None:
        """Add ``component`` (None: nothing to keep on this rank) under ``name``."""
        if name in self.shared or name in self.per_rank:
            raise ValueError(f"a component named {name!r} is already registered")
        if component is not None:
            (self.per_rank if per_rank else self.shared)[name] = component

    # -------------------------------------------------------------------------------------- save
    def save(self, step: int, info: dict) -> str:
        """Collective: checkpoint ``step`` with ``info`` in its manifest; returns the tag."""
        client = {"components": {n: c.state_dict() for n, c in self.shared.items()},
                  "manifest_sha256": self.data_hash, "config": self.config}
        own = {n: c.state_dict() for n, c in self.per_rank.items()}
        return checkpoint.save(self.engine, self.ckpt_dir, step, client, own, info, self.keep_last,
                               self.keep_every)

    # -------------------------------------------------------------------------------------- load
    def load(self, ckpt_dir: Path, tag: str, verified: bool = False, keep: tuple[str, ...] = ()) -> dict:
        """Collective: restore the engine and every registered component (except those named in ``keep``) from
        ``ckpt_dir/tag``; returns its manifest info."""
        client, own, info = checkpoint.load(self.engine, ckpt_dir, tag, verified=verified)
        if client["manifest_sha256"] != self.data_hash:
            raise checkpoint.CheckpointError(
                f"{ckpt_dir / tag} was trained on other shards (manifest hash differs); point data.root at the "
                "original shards or start a new out_dir")
        saved = components(client)
        for name, component in self.shared.items():
            if name not in keep and name in saved:  # absent: a checkpoint from before the component existed
                component.load_state_dict(saved[name])
        for name, component in self.per_rank.items():
            if name not in keep:
                component.load_state_dict(own[name])
        return info

    def resume(self, resume: str | None) -> tuple[Path, str] | None:
        """Collective: restore the checkpoint ``train.resume`` names (None when starting afresh); returns it.

        ``auto`` takes ``latest``; if ``latest`` is damaged or names a checkpoint that fails verification, it
        warns, names the file, and takes the newest tag that verifies. A run never starts afresh over existing
        checkpoints unless ``resume`` is ``restart``."""
        found = [None]

        def choose() -> None:
            found[0] = self._choose(resume)

        checkpoint.on_rank0(choose)  # its error is raised on every rank
        dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            return None
        ckpt_dir, tag = Path(found[0][0]), found[0][1]
        self.load(ckpt_dir, tag, verified=True)
        if ckpt_dir.resolve() == self.ckpt_dir.resolve():  # an older tag of this run: a crash before the next
            checkpoint.on_rank0(lambda: checkpoint.publish_latest(ckpt_dir, tag))  # save resumes it again
        return ckpt_dir, tag

    def initialise(self, source: str, kind: str, verified: Path | None = None) -> dict:
        """Collective: a new run's weights from the checkpoint ``source`` (a tag, or a directory with ``latest``;
        any layout, or ``mlfm convert``'s output), its ``param`` or ``ema`` weights; everything else starts
        fresh (``verified``: a tag directory already verified in this process, a distillation's teacher). Returns
        the record of where they came from (``origin``), and the source's client state."""
        from mlfm_scale.train.reshard import load_weights

        tag_dir = checkpoint.resolve_verified(source, "train.init_from", verified)
        client, fresh = load_weights(self.engine, tag_dir, kind)
        origin = {"init_from": str(tag_dir.absolute()), "manifest_sha256": checkpoint.manifest_sha256(tag_dir),
                  "weights": kind, "fresh": fresh}
        return {"origin": origin, "client": client}

    def _choose(self, resume: str | None) -> tuple[str, str] | None:
        """Rank 0: the (checkpoint directory, tag) to resume from, verified; None to start afresh."""
        for line in checkpoint.recover(self.ckpt_dir):
            print(f"WARNING: {line}", file=sys.stderr, flush=True)
        if resume in (None, "restart"):
            existing = checkpoint.tags(self.ckpt_dir)
            if existing and resume is None:
                raise checkpoint.CheckpointError(
                    f"{self.ckpt_dir} already holds checkpoints ({', '.join(existing[-3:])}); set train.resume=auto "
                    "to continue that run, choose another out_dir, or set train.resume=restart to start over "
                    "(its checkpoints are then replaced as the new run saves)")
            return None
        if resume != "auto":
            ckpt_dir, tag = checkpoint.resolve(resume)
            if checkpoint.verify(ckpt_dir / tag).get("layout") == "layout-free":
                raise checkpoint.CheckpointError(
                    f"train.resume={resume}: {ckpt_dir / tag} holds weights only (`mlfm convert`'s output), no "
                    f"training state to resume; start a new run from it with train.init_from={resume}")
            return str(ckpt_dir), tag
        latest, problem = checkpoint.latest_tag(self.ckpt_dir), None
        if latest is not None:
            try:
                checkpoint.verify(self.ckpt_dir / checkpoint.checked_tag(latest))
                return str(self.ckpt_dir), latest
            except checkpoint.CheckpointError as e:
                problem = str(e)
        elif (self.ckpt_dir / checkpoint.LATEST).exists():
            problem = "it cannot be read"
        fallback = checkpoint.newest_verified(self.ckpt_dir)
        if problem is not None or (latest is None and fallback is not None):
            where = self.ckpt_dir / checkpoint.LATEST
            if fallback is None:
                raise checkpoint.CheckpointError(
                    f"{where}: {problem or 'missing'}, and no checkpoint in {self.ckpt_dir} verifies; nothing to "
                    "resume. Restore the files, or set train.resume=restart to start over")
            print(f"WARNING: {where}: {problem or 'missing'}; resuming from {self.ckpt_dir / fallback}, the newest "
                  "checkpoint that verifies", file=sys.stderr, flush=True)
            return str(self.ckpt_dir), fallback
        if checkpoint.tags(self.ckpt_dir):
            raise checkpoint.CheckpointError(
                f"no checkpoint in {self.ckpt_dir} verifies; nothing to resume. Restore the files, or set "
                "train.resume=restart to start over")
        return None

    def last_good(self, before: int) -> str | None:
        """Rank 0: the newest tag below step ``before`` whose steps were all good, and whose files verify."""
        for tag in reversed(checkpoint.tags(self.ckpt_dir)):
            if checkpoint.step_of(tag) >= before:
                continue
            try:
                manifest = checkpoint.verify(self.ckpt_dir / tag)
            except checkpoint.CheckpointError:
                continue
            if manifest.get("good", True):
                return tag
        return None
