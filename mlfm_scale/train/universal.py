"""The layout-free form of a checkpoint: every parameter as one full tensor under one canonical name.

A tag directory written by any supported layout (megatron TP × DeepSpeed ZeRO-1/2/3, or TP × a DeepSpeed
pipeline × ZeRO-1) is read back,
without a process group, into ``{kind: {canonical name: full float32 tensor}}`` for the kinds

    param        the fp32 master weights (frozen parameters: their weights)
    exp_avg      AdamW's first moment        exp_avg_sq   its second moment
    ema          the EMA of the trained weights (train/ema.py); frozen parameters: their weights

Canonical names are the model's own without the engine's ``model.`` prefix and megatron's ``decoder.``
nesting: ``embedding.weight`` [V_pad, d], ``gamma_embedding.*``, ``layers.{i}.*``, ``final_norm.weight``,
``output_layer.weight`` [V_pad, d] (the vocabulary padding is part of the model, independent of TP).
TP shards are merged along each parameter's partition dimension (:data:`TP_PARTITIONS`; SwiGLU's fc1 is split
with stride 2: each rank holds [gate_r; up_r]); ZeRO shards are gathered over the data-parallel ranks.
A pipeline checkpoint names parameters by pipeline layer (``0.`` the first stage's embeddings, ``i.layer.`` AdaLN
layer i, the last index the final norm and output layer: parallel/pipeline.py); :func:`canonical_name` maps them,
and its files come per model slice (stage × TP rank; frozen weights in DeepSpeed's per-layer files).

Files are memory-mapped one at a time (each dropped before the next; only the tensors read are paged in) and
copied into one preallocated buffer per parameter, so the peak memory is about one copy of the requested kinds
plus one file.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from mlfm_scale.train.checkpoint import CheckpointError, verify

KINDS = ("param", "exp_avg", "exp_avg_sq", "ema")
# canonical name pattern → (partition dim, stride) of megatron's tensor parallelism; others are replicated
TP_PARTITIONS = (
    (re.compile(r"^(embedding|output_layer)\.weight$"), 0, 1),  # vocab-parallel rows
    (re.compile(r"\.self_attention\.linear_qkv\.weight$"), 0, 1),  # column parallel, heads contiguous
    (re.compile(r"\.mlp\.linear_fc1\.weight$"), 0, 2),  # column parallel, gate and up halves each split
    (re.compile(r"\.(self_attention\.linear_proj|mlp\.linear_fc2)\.weight$"), 1, 1),  # row parallel
    # LoRA (model/lora.py): B sharded like a column-parallel base's rows, A like a row-parallel base's columns
    (re.compile(r"(^output_layer|\.linear_qkv)\.lora\.b$"), 0, 1),
    (re.compile(r"\.linear_fc1\.lora\.b$"), 1, 1),  # [2, ffn, r]: the gate and up adapters' rows
    (re.compile(r"\.(linear_proj|linear_fc2)\.lora\.a$"), 1, 1),
)


PIPELINE_NAME = re.compile(r"^(\d+)\.(layer\.)?")


def canonical_name(name: str) -> str:
    """An engine / megatron parameter name → its canonical name (``model.decoder.layers.0.x`` → ``layers.0.x``;
    pipeline layer names: ``3.layer.x`` → ``layers.2.x``, ``0.embedding.weight`` → ``embedding.weight``)."""
    if m := PIPELINE_NAME.match(name):
        rest = name[m.end():]
        if m[2]:
            return f"layers.{int(m[1]) - 1}.{rest}"
        return rest.replace("final_layernorm.", "final_norm.", 1)
    name = name.removeprefix("model.")
    return name.replace("decoder.layers.", "layers.", 1).replace("decoder.final_layernorm.", "final_norm.", 1)


def tp_partition(name: str) -> tuple[int, int] | None:
    """(dim, stride) along which TP splits the canonical parameter ``name``, or None when replicated."""
    return next(((dim, stride) for pattern, dim, stride in TP_PARTITIONS if pattern.search(name)), None)


def merge_tp(pieces: torch.Tensor, partition: tuple[int, int] | None) -> torch.Tensor:
    """pieces [tp, *local shape] (rank order) → the full tensor; replicated: the first piece."""
    if partition is None:
        return pieces[0]
    dim, stride = partition
    if dim == 0 and stride == 1:
        return pieces.reshape(-1, *pieces.shape[2:])  # a view: no copy
    chunks = [p.chunk(stride, dim) for p in pieces.unbind(0)]
    return torch.cat([torch.cat([c[i] for c in chunks], dim) for i in range(stride)], dim)


def split_tp(full: torch.Tensor, partition: tuple[int, int] | None, tp: int, rank: int) -> torch.Tensor:
    """The TP-local slice of ``full`` held by TP rank ``rank`` of ``tp`` (inverse of :func:`merge_tp`)."""
    if partition is None or tp == 1:
        return full
    dim, stride = partition
    if full.size(dim) % (tp * stride):
        raise CheckpointError(f"a dimension of {full.size(dim)} cannot be split {tp} ways (stride {stride})")
    return torch.cat([part.chunk(tp, dim)[rank] for part in full.chunk(stride, dim)], dim)


def load_file(path: Path, map_location="cpu") -> dict:
    """A DeepSpeed / our checkpoint file with ``torch.load(weights_only=True, mmap=True)``, allowing only the plain
    types DeepSpeed and our client state store besides tensors (numpy RNG state, DeepSpeed's enums, loss scaler).
    Training resumes read DeepSpeed's files through it too (train/checkpoint.py), so no checkpoint file is ever
    unpickled with arbitrary globals."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, LossScaler, fragment_address, np.ndarray, np.dtype, np._core.multiarray._reconstruct,
               type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):  # memory-mapped: only the tensors read are paged in
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)


class CheckpointReader:
    """Reads one verified checkpoint tag directory of a TP × ZeRO layout into the layout-free form."""

    def __init__(self, tag_dir: str | Path):
        self.tag_dir = Path(tag_dir)
        self.info = verify(self.tag_dir)  # every file's size and sha256: a damaged shard is refused, named
        self.tp, self.dp, self.stage = self.info["tp"], self.info["dp"], self.info["zero_stage"]
        self.pp = self.info.get("pp", 1)
        if self.stage == 0:
            raise CheckpointError(f"{self.tag_dir}: zero_stage 0 checkpoints are not supported; train with ZeRO ≥ 1")
        self._states = self._model_states(0)
        stages = [self._states] + [self._model_states(s * self.tp) for s in range(1, self.pp)]
        self.shapes = {canonical_name(n): s for st in stages for group in st["param_shapes"] for n, s in group.items()}
        self.frozen = {canonical_name(n): s for st in range(self.pp) for n, s in self._frozen_shapes(st, stages[st])}

    # ------------------------------------------------------------------------------------- files
    # Files come per model slice mp = stage × tp + TP rank (DeepSpeed's numbering; mp = TP rank without a pipeline)
    def _model_states_path(self, mp: int, dp_rank: int = 0) -> Path:
        name = f"mp_rank_{mp:02d}_model_states.pt"
        return self.tag_dir / (f"zero_pp_rank_{dp_rank}_{name}" if self.stage == 3 else name)

    def _model_states(self, mp: int, dp_rank: int = 0) -> dict:
        return load_file(self._model_states_path(mp, dp_rank))

    def _optim(self, mp: int, dp_rank: int) -> dict:
        name = f"zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt"
        if not (self.tag_dir / name).is_file():  # a bf16 run's (the same fp32 state, DeepSpeed names it so)
            name = "bf16_" + name
        return load_file(self.tag_dir / name)["optimizer_state_dict"]

    def _ema(self, mp: int, dp_rank: int) -> dict:
        stage, tp_rank = divmod(mp, self.tp)  # global rank: megatron's order, pipeline stage slowest
        return load_file(self.tag_dir / f"rank{(stage * self.dp + dp_rank) * self.tp + tp_rank:05d}.pt")["ema"]

    def _module(self, mp: int, states: dict) -> dict[str, torch.Tensor]:
        """The weights of model slice ``mp``: the module state, or a pipeline stage's per-layer files."""
        if self.pp == 1:
            return states["module"]
        stage, tp_rank = divmod(mp, self.tp)
        lo, hi = self.info["stages"][stage:stage + 2]
        return {f"{i}.{n}": t for i in range(lo, hi)
                for n, t in load_file(self.tag_dir / f"layer_{i:02d}-model_{tp_rank:02d}-model_states.pt").items()}

    def _frozen_shapes(self, stage: int, states: dict) -> list[tuple[str, torch.Size]]:
        if self.stage == 3:
            return list((states.get("frozen_param_shapes") or {}).items())
        trained = {n for group in states["param_shapes"] for n in group}
        return [(n, t.shape) for n, t in self._module(stage * self.tp, states).items()
                if torch.is_tensor(t) and n not in trained]

    def client_state(self) -> dict:
        """Our client state (config, loader, objective, rng, counters) and DeepSpeed's engine counters."""
        return self._states

    def has_ema(self) -> bool:
        """Whether the checkpoint carries EMA weights (``train.ema_decay`` runs always do)."""
        return (self.tag_dir / "rank00000.pt").is_file() and bool(self._ema(0, 0))

    # ------------------------------------------------------------------------------------- kinds
    def optimizer_step(self) -> int:
        """AdamW's step count (equal for every parameter; DeepSpeed keeps one per flat group)."""
        state = self._optim(0, 0)
        inner = state["optimizer_state_dict"] if self.stage == 3 else state["base_optimizer_state"]
        return int(next(iter(inner["state"].values()))["step"])

    def read(self, kinds: Iterable[str] = KINDS) -> dict[str, dict[str, torch.Tensor]]:
        """``{kind: {canonical name: full float32 tensor}}`` for ``kinds`` (see the module docstring)."""
        out = {}
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}: one of {KINDS}")
            names = dict(self.shapes) | (self.frozen if kind in ("param", "ema") else {})
            buffers = {n: torch.zeros(self.tp if tp_partition(n) else 1, *shape, dtype=torch.float32)
                       for n, shape in names.items()}
            for mp in range(self.pp * self.tp):
                self._fill(kind, mp, buffers)
            # merged one by one, each buffer dropped as it is merged: at most one parameter is held twice
            out[kind] = {n: merge_tp(buffers.pop(n), tp_partition(n)) for n in list(buffers)}
        return out

    def _fill(self, kind: str, mp: int, buffers: dict[str, torch.Tensor]) -> None:
        """Copy model slice ``mp``'s pieces of ``kind`` into ``buffers`` [tp or 1, *local shape]."""
        tp_rank = mp % self.tp

        def target(name: str) -> torch.Tensor | None:
            if name not in buffers or (tp_rank > 0 and buffers[name].size(0) == 1):
                return None  # absent, or a replicated parameter already taken from TP rank 0
            return buffers[name][tp_rank if buffers[name].size(0) > 1 else 0].view(-1)

        states = self._states if mp == 0 else self._model_states(mp)
        trained = [(canonical_name(n), math.prod(s)) for g in states["param_shapes"] for n, s in g.items()]
        if kind in ("param", "ema"):
            self._fill_frozen(mp, states, target)
        if kind == "ema":
            for dp_rank in range(self.dp if self.stage == 3 else 1):
                ema = {canonical_name(n): t for n, t in self._ema(mp, dp_rank).items()}
                for name, numel in trained:
                    if (dest := target(name)) is not None and name in ema:
                        _place(dest, ema[name].flatten(), dp_rank, self.dp if self.stage == 3 else 1, numel)
            return
        for dp_rank in range(self.dp):
            optim = self._optim(mp, dp_rank)
            if self.stage == 3:  # each rank's flat groups: every parameter's partition, end to end
                inner = optim["optimizer_state_dict"]["state"]
                groups = optim["fp32_flat_groups"] if kind == "param" else [inner[g][kind] for g in sorted(inner)]
                size = [-(-numel // self.dp) for _, numel in trained]
                params = [(None if (dest := target(name)) is None else dest[dp_rank * n:(dp_rank + 1) * n], n)
                          for (name, _), n in zip(trained, size)]
                start = 0
                for group in groups:  # sub-groups split at parameter boundaries: walk them as one sequence
                    _place_range(group.flatten(), start, params)
                    start += group.numel()
            else:  # each group flat over all ranks, parameters end to end; a rank holds one contiguous slice
                inner = optim["base_optimizer_state"]["state"]
                groups = (optim["single_partition_of_fp32_groups"] if kind == "param"
                          else [inner[g][kind] for g in sorted(inner)])
                for g, shapes in enumerate(states["param_shapes"]):
                    piece = groups[g].flatten()
                    _place_range(piece, dp_rank * piece.numel(),
                                 [(target(canonical_name(n)), math.prod(s)) for n, s in shapes.items()])
            del optim, inner, groups  # before the next file is loaded

    def _fill_frozen(self, mp: int, states: dict, target) -> None:
        if self.stage < 3:
            for n, t in self._module(mp, states).items():
                if canonical_name(n) in self.frozen and (dest := target(canonical_name(n))) is not None:
                    dest.copy_(t.flatten())
            return
        for dp_rank in range(self.dp):
            fragments = (states if dp_rank == 0 else self._model_states(mp, dp_rank))["frozen_param_fragments"]
            for n, t in fragments.items():
                if (dest := target(canonical_name(n))) is not None:
                    _place(dest, t.flatten(), dp_rank, self.dp, dest.numel())


def _place(dest: torch.Tensor, part: torch.Tensor, rank: int, world: int, numel: int) -> None:
    """Copy ZeRO-3 partition ``rank`` of ``world`` (ceil(numel / world) elements, the last padded) into ``dest``."""
    size = -(-numel // world)
    start = rank * size
    count = max(0, min(size, numel - start))
    dest[start:start + count].copy_(part[:count])


def _place_range(piece: torch.Tensor, start: int, params: list[tuple[torch.Tensor | None, int]]) -> None:
    """Copy the slice [start, start + len(piece)) of a flat sequence of parameters laid end to end (``params``:
    (destination or None, numel) in order; a destination shorter than its numel drops the padding at its end)
    into the destinations it overlaps."""
    end, offset = start + piece.numel(), 0
    for dest, numel in params:
        if dest is not None:
            lo, hi = max(offset, start), min(offset + min(numel, dest.numel()), end)
            if lo < hi:
                dest[lo - offset:hi - offset].copy_(piece[lo - start:hi - start])
        offset += numel
        if offset >= end:
            break


class LayoutFreeReader:
    """Reads a tag that holds only the layout-free form (``mlfm convert``'s output: its manifest's ``layout``
    is ``layout-free``), with :class:`CheckpointReader`'s interface."""

    def __init__(self, tag_dir: str | Path):
        self.tag_dir = Path(tag_dir)
        self.info = verify(self.tag_dir)
        self._state = load_file(self.tag_dir / "universal" / "state.pt")

    def client_state(self) -> dict:
        return self._state["client"]

    def has_ema(self) -> bool:
        return (self.tag_dir / "universal" / "ema.safetensors").is_file()

    def read(self, kinds: Iterable[str] = ("param",)) -> dict[str, dict[str, torch.Tensor]]:
        from safetensors.torch import load_file as load_safetensors

        return {kind: load_safetensors(self.tag_dir / "universal" / f"{kind}.safetensors") for kind in kinds}


def open_checkpoint(tag_dir: str | Path) -> CheckpointReader | LayoutFreeReader:
    """The reader for the checkpoint tag ``tag_dir``, whichever form it has (the reader verifies it)."""
    import json

    from mlfm_scale.train.checkpoint import MANIFEST

    path = Path(tag_dir) / MANIFEST
    layout = json.loads(path.read_text()).get("layout") if path.is_file() else None
    return LayoutFreeReader(tag_dir) if layout == "layout-free" else CheckpointReader(tag_dir)
