"""Training batches from prepared shards: mosaicml-streaming over one or more sources, collated to
:class:`~mlfm_scale.data.batch.MicroBatch`.

Samples are split by data-parallel rank; tensor-parallel peers (consecutive ranks, megatron's order) read
the same samples through ``replication = tp``. Under a pipeline only the first stage reads; streaming is
shown that stage's ranks as the whole world (:class:`ReaderWorld`). The shuffle is seeded by the run seed.
The loader's state (epoch, samples consumed) is saved in checkpoints so a resumed run continues mid-epoch with
no sample repeated or skipped.

Several runs may start on one node at the same moment: each has its own shard cache (:func:`cache_dir`) and
registers its datasets' shared memory race-free (:func:`register_shm_prefix`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlfm_scale.config import Config
from mlfm_scale.data.batch import MicroBatch
from mlfm_scale.data.manifest import check_compatible, manifest_sha256, read_manifest
from mlfm_scale.errors import UserError


def source_dirs(cfg: Config) -> list[tuple[Path, float]]:
    """(prepared directory, weight) of every training source."""
    if cfg.data.sources:
        return [(cfg.path(s.path), s.weight) for s in cfg.data.sources]
    return [(cfg.path(cfg.data.root), 1.0)]


def load_manifest(cfg: Config) -> dict:
    """The first source's manifest, after checking every source against the config and against each other
    (one kind — pretraining or SFT —, one tokenizer)."""
    manifests = [read_manifest(d) for d, _ in source_dirs(cfg)]
    for (d, _), m in zip(source_dirs(cfg), manifests):
        check_compatible(m, seq_len=cfg.data.seq_len, vocab_size=cfg.model.vocab_size, kind=manifests[0]["kind"])
        if m["tokenizer"]["sha256"] != manifests[0]["tokenizer"]["sha256"]:
            raise UserError(f"source {d} was tokenised with another tokenizer than {source_dirs(cfg)[0][0]}: "
                            "prepare every source with the same --tokenizer")
    return manifests[0]


def data_fingerprint(cfg: Config) -> str:
    """One hash of every source's manifest and weight: what a checkpoint was trained on."""
    parts = [f"{manifest_sha256(d)}:{w}" for d, w in source_dirs(cfg)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def cache_dir(cfg: Config, source: Path) -> Path:
    """Where streaming keeps its local copy of ``source``: ``data.cache`` (default: node-local under the system
    temporary directory, never a shared filesystem that nodes would write concurrently), keyed by the source's
    manifest hash so re-prepared or same-named sources never reuse stale shards, and by the run (its out_dir):
    streaming refuses two live datasets on one cache directory, so two runs on one node reading the same data
    each keep their own copy (a resumed run finds its own again)."""
    root = Path(cfg.data.cache) if cfg.data.cache else Path(tempfile.gettempdir()) / "mlfm-data-cache"
    run = hashlib.sha256(os.path.abspath(cfg.out_dir).encode()).hexdigest()[:8]
    return root / f"{manifest_sha256(source)[:20]}-{run}"


# Streaming names a dataset's shared memory and file locks PREFIX_name, one node-wide PREFIX per dataset. Its own
# registration (get_shm_prefix) lets every rank look for the first free PREFIX from 0, then the node's first
# rank creates PREFIX_locals: two jobs starting together find the same PREFIX and one fails
# (FileExistsError: '/00000N_locals'). Ours: the node's first rank claims a PREFIX by creating PREFIX_locals
# exclusively (taken → try the next), starting from a random point of 1000..999999, and tells the other ranks.
# Streaming's clean_stale_shared_memory() unlinks every PREFIX from 0 up to the first unused one, live or not;
# starting at 1000 keeps a live run's memory out of its reach. Nothing here removes memory: a run killed by
# SIGKILL leaves its PREFIX in use (skipped) until /dev/shm is cleared.
SHM_PREFIXES = range(1000, 1_000_000)  # streaming formats PREFIX with six digits


def claim_shm_prefix(streams_local: list[str], first: int | None = None) -> tuple[int, object]:
    """(PREFIX, its ``_locals`` SharedMemory): the first PREFIX from ``first`` (default: random) whose names are
    all free and whose ``_locals`` this call created."""
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import SharedMemory, _get_path
    from streaming.base.shared.prefix import _pack_locals

    def in_use(prefix: int) -> bool:
        if any(os.path.exists(os.path.join(tempfile.gettempdir(), _get_path(prefix, lock)))
               for lock in (BARRIER_FILELOCK, CACHE_FILELOCK)):
            return True
        for name in SHM_TO_CLEAN:
            try:
                SharedMemory(_get_path(prefix, name), False, auto_cleanup=False).cleanup()
                return True
            except PermissionError:
                return True  # another user's
            except FileNotFoundError:
                pass
        return False

    # SystemRandom: a run may have seeded `random`, and two runs with one seed must not start at one PREFIX
    first = random.SystemRandom().randrange(len(SHM_PREFIXES)) if first is None else SHM_PREFIXES.index(first)
    for i in range(len(SHM_PREFIXES)):
        prefix = SHM_PREFIXES[(first + i) % len(SHM_PREFIXES)]
        if in_use(prefix):
            continue
        data = _pack_locals(streams_local, prefix)
        try:
            shm = SharedMemory(_get_path(prefix, LOCALS), True, len(data))
        except FileExistsError:
            continue  # another job claimed it between the look and the claim
        shm.buf[:len(data)] = data
        return prefix, shm
    raise RuntimeError(f"every streaming shared-memory prefix {SHM_PREFIXES.start}..{SHM_PREFIXES.stop - 1} is "
                       "in use on this node: remove /dev/shm/*_locals of runs that are gone")


def register_shm_prefix(streams_local: list[str], streams_remote: list[str | None], world,
                        group=None) -> tuple[int, object]:
    """Streaming's ``get_shm_prefix`` (same arguments and result), race-free between jobs: the node's first rank
    claims a PREFIX, every rank of ``group`` (the readers; None: the whole world) learns its node's, the others
    attach to it. Collective over ``group`` when torch.distributed is initialised. Streaming's check that no
    other live dataset uses the same local directories is not repeated: every run has its own (``cache_dir``)."""
    import torch.distributed as dist
    from streaming.base.constant import LOCALS
    from streaming.base.shared import SharedMemory, _get_path
    from streaming.base.shared.prefix import _check_self, _unpack_locals

    _check_self(streams_local)
    prefix, shm, problem = None, None, None
    if world.is_local_leader:
        try:
            prefix, shm = claim_shm_prefix(streams_local)
        except (OSError, RuntimeError) as e:  # told to every rank below, so none waits for a prefix
            problem = f"{type(e).__name__}: {e}"
    if dist.is_available() and dist.is_initialized():
        claims = [None] * dist.get_world_size(group)
        dist.all_gather_object(claims, (prefix, problem), group=group)
        problem = next((p for _, p in claims if p is not None), None)
        prefix = claims[world.node * world.ranks_per_node][0]  # the node's first rank (streaming's node layout)
    if problem is not None:
        raise RuntimeError(f"registering the data's shared memory failed on a node: {problem}")
    if not world.is_local_leader:
        shm = SharedMemory(_get_path(prefix, LOCALS), False)
        if _unpack_locals(bytes(shm.buf)) != (streams_local, prefix):
            raise RuntimeError(f"streaming prefix {prefix} holds {_unpack_locals(bytes(shm.buf))}, not this node's "
                               f"first rank's {streams_local}: the ranks of a node were given different data")
    return prefix, shm


@contextlib.contextmanager
def shm_registration(group=None) -> Iterator[None]:
    """StreamingDatasets built inside register with :func:`register_shm_prefix` (streaming looks the function up
    in its dataset module at construction; tests/mlfm_scale/data/test_loader.py pins that)."""
    import streaming.base.dataset as streaming_dataset

    original = streaming_dataset.get_shm_prefix
    streaming_dataset.get_shm_prefix = functools.partial(register_shm_prefix, group=group)
    try:
        yield
    finally:
        streaming_dataset.get_shm_prefix = original


@dataclass(frozen=True)
class ReaderWorld:
    """The world streaming sees when it is not the whole process group: under a pipeline only the first
    stage reads shards (the last stage gets its targets through the pipeline), and the first stage's ranks are
    global ranks 0 .. tp·dp − 1 (megatron's stage-major order), so streaming is shown that stage as its world.
    Streaming synchronises with ``torch.distributed.barrier()`` while it builds a dataset; inside
    ``environment()`` those barriers span the reading ranks only (``group``)."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    group: object

    @classmethod
    def first_pipeline_stage(cls, pp: int) -> ReaderWorld | None:
        """Collective over every rank; this rank's view when it is in the first stage, else None."""
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        per_stage, local_world = world // pp, int(os.environ["LOCAL_WORLD_SIZE"])
        if local_world % per_stage and per_stage % local_world:
            raise UserError(f"a pipeline stage has {per_stage} processes and a node {local_world}: one must divide "
                            "the other (place whole stages on nodes, or whole nodes in a stage)")
        group = dist.new_group(list(range(per_stage)))
        local_size = min(local_world, per_stage)
        return cls(rank, per_stage, rank % local_size, local_size, group) if rank < per_stage else None

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE as streaming should read them, and its barriers
        over the readers; all restored afterwards."""
        import torch.distributed as dist

        names = {"RANK": self.rank, "WORLD_SIZE": self.size, "LOCAL_RANK": self.local_rank,
                 "LOCAL_WORLD_SIZE": self.local_size}
        saved = {n: os.environ.get(n) for n in names}
        os.environ.update({n: str(v) for n, v in names.items()})
        barrier = dist.barrier
        dist.barrier = lambda *args, **kw: barrier(group=self.group)
        try:
            yield
        finally:
            dist.barrier = barrier
            for n, v in saved.items():
                if v is None:
                    os.environ.pop(n, None)
                else:
                    os.environ[n] = v


def segment_ids(tokens: torch.Tensor, lengths: torch.Tensor, doc_starts: list[np.ndarray] | None) -> torch.Tensor:
    """Long[b, s] attention segments: one per document when ``doc_starts`` is given, else one per row; the
    padded tail of a row (positions ≥ length) is always a segment of its own."""
    b, s = tokens.shape
    seg = torch.zeros(b, s, dtype=torch.long)
    if doc_starts is not None:
        for i, starts in enumerate(doc_starts):
            marks = torch.zeros(s, dtype=torch.long)
            marks[torch.as_tensor(starts[1:], dtype=torch.long)] = 1
            seg[i] = torch.cumsum(marks, 0)
    pad = torch.arange(s)[None] >= lengths[:, None]
    return torch.where(pad, seg.max(dim=1, keepdim=True).values + 1, seg)


def collate(samples: list[dict], within_documents: bool) -> dict:
    """Streaming samples → the tensors of a MicroBatch (plus ``block_id`` [b] for bookkeeping)."""
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    lengths = torch.tensor([int(s["length"]) for s in samples], dtype=torch.long)
    starts = [s["doc_starts"] for s in samples] if within_documents else None
    out = {"tokens": tokens, "lengths": lengths, "segment_ids": segment_ids(tokens, lengths, starts),
           "block_id": torch.tensor([int(s["block_id"]) for s in samples], dtype=torch.long)}
    if "response_mask" in samples[0]:
        out["response"] = torch.from_numpy(np.stack([s["response_mask"] for s in samples]).astype(bool))
    return out


def to_micro_batch(batch: dict, device: torch.device) -> MicroBatch:
    response = batch.get("response")
    return MicroBatch(tokens=batch["tokens"].to(device), lengths=batch["lengths"].to(device),
                      segment_ids=batch["segment_ids"].to(device),
                      response=None if response is None else response.to(device))


class TrainData:
    """An endless iterator of collated batches over epochs, with a saveable position."""

    def __init__(self, cfg: Config, split: str = "train", shuffle: bool | None = None,
                 world: ReaderWorld | None = None):
        from streaming import Stream, StreamingDataset
        from streaming.base.dataloader import StreamingDataLoader

        self.world = world
        streams = [Stream(remote=str(d), local=str(cache_dir(cfg, d)), split=split,
                          proportion=w if len(source_dirs(cfg)) > 1 else None)
                   for d, w in source_dirs(cfg)]
        with self._environment(), shm_registration(world.group if world else None):
            self.dataset = StreamingDataset(streams=streams, batch_size=cfg.train.micro_batch_size,
                                            shuffle=cfg.data.shuffle if shuffle is None else shuffle,
                                            shuffle_seed=cfg.seed, replication=cfg.parallel.tp
                                            if cfg.parallel.tp > 1 else None, num_canonical_nodes=1,
                                            batching_method="per_stream" if cfg.data.mix == "per_micro_batch"
                                            else "random")
        within = cfg.model.attend_within_documents
        self.loader = StreamingDataLoader(self.dataset, batch_size=cfg.train.micro_batch_size,
                                          num_workers=cfg.data.num_workers, drop_last=True,
                                          collate_fn=lambda samples: collate(samples, within))
        self.split = split
        self._iter: Iterator | None = None

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        empty = 0  # fresh epochs that yielded nothing: one is a position saved at an epoch's end, two is no data
        while True:
            fresh = self._iter is None
            if fresh:
                self._iter = iter(self.loader)
            try:
                return next(self._iter)
            except StopIteration:
                empty = empty + 1 if fresh else 0
                if empty >= 2:
                    raise UserError(f"split {self.split!r} has fewer samples per data-parallel rank than "
                                    "train.micro_batch_size: prepare more data or use smaller batches") from None
                self._iter = None  # next epoch

    def _environment(self):
        return self.world.environment() if self.world else contextlib.nullcontext()

    def state_dict(self) -> dict:
        with self._environment():
            return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        with self._environment():
            self.loader.load_state_dict(state)
        self._iter = None
