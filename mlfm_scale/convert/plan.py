"""What a converter returns: our model's base weights under canonical names, each read only when asked.

A converter (``smdm.plan``, ``llada.plan``) checks a source against the model config and lists one
:class:`Entry` per canonical parameter (train/universal.py names, TP = 1 layout); nothing is read until an
entry's ``read()``, so the weights stream one tensor at a time (peak: one converted tensor and its sources).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from mlfm_scale.config import ModelSection
from mlfm_scale.convert.source import SafetensorsSource
from mlfm_scale.errors import UserError


@dataclass(frozen=True)
class Entry:
    """One canonical parameter: ``read()`` → a float32 tensor of ``shape`` or of fewer rows, the rest being
    zero (the vocabulary padding, and output rows the source lacks: a writer appends the zeros, so the padded
    copy of the largest tensor is never made); ``full()`` pads in memory."""

    name: str
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]

    def full(self) -> torch.Tensor:
        """The tensor of exactly ``shape``."""
        return pad_rows(self.read(), self.shape[0])


@dataclass
class ConversionPlan:
    """The converted vocabulary (its size includes the mask token), the mask id, the entries in model order,
    the source format's name and notes for the record (where the weights came from, what was inferred)."""

    vocab_size: int
    mask_id: int
    entries: list[Entry]
    source_format: str
    notes: dict = field(default_factory=dict)


def network_entries(source: SafetensorsSource, padded: int, d: int, keys: tuple[str, str, str],
                    layers: Iterable[list[Entry]]) -> list[Entry]:
    """Our parameter order: the input table, each layer's entries, the final norm, the head. ``keys``: the source's
    (table, final norm, head) names; both vocabulary tables are declared ``padded`` rows (the writer pads)."""
    embedding, final_norm, head = keys
    entries = [Entry("embedding.weight", (padded, d), lambda: source.get(embedding))]
    for layer in layers:
        entries += layer
    return entries + [Entry("final_norm.weight", (d,), lambda: source.get(final_norm)),
                      Entry("output_layer.weight", (padded, d), lambda: source.get(head))]


def check(cond: bool, message: str) -> None:
    """Raise a :class:`UserError` with ``message`` unless ``cond``."""
    if not cond:
        raise UserError(message)


def model_name(name: str) -> str:
    """A canonical name → the MLFMModel parameter it loads into (inverse of ``universal.canonical_name``)."""
    if name.startswith("layers."):
        return "decoder." + name
    if name.startswith("final_norm."):
        return "decoder.final_layernorm." + name.removeprefix("final_norm.")
    return name


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t [r, ...] → [rows, ...]: zero rows appended (the vocabulary padding, or outputs the source lacks)."""
    if t.size(0) == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])])


def grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Separate projections q [h·hd, d], k and v [g·hd, d] → megatron's fused [(h + 2g)·hd, d], laid out per
    query group as [the group's h/g query heads; its key head; its value head]."""
    d = q.size(1)
    return torch.cat([q.view(groups, -1, d), k.view(groups, -1, d), v.view(groups, -1, d)], 1).reshape(-1, d)


def require_config(source: str, found: dict[str, tuple[Any, str]], cfg: ModelSection, hint: str = "") -> None:
    """One UserError listing every ``model.<field>`` that differs from the checkpoint, with the overrides that
    fix them all. ``found``: field → (the checkpoint's value, a phrase saying where it shows)."""
    ours = cfg.model_dump() | {"num_query_groups": cfg.query_groups}
    wrong = {f: (value, where) for f, (value, where) in found.items() if ours[f] != value}
    if wrong:
        lines = "\n".join(f"  {where}, but model.{f}={ours[f]}" for f, (_, where) in wrong.items())
        fix = " ".join(f"model.{f}={value}" for f, (value, _) in wrong.items())
        raise UserError(f"{source} does not fit the model config:\n{lines}\nset {fix}{hint}")


def require_shapes(source: SafetensorsSource, expected: dict[str, tuple[int, ...]]) -> None:
    """Every key present with its expected shape (once the config matches, a mismatch means a damaged or
    mixed checkpoint)."""
    for key, shape in expected.items():
        found = source.shape(key)
        check(found == shape, f"{key} in {source.where(key)} has shape {list(found)}, but the checkpoint's "
                              f"other tensors and the config imply {list(shape)}: the checkpoint is inconsistent")


def require_known_keys(source: SafetensorsSource, expected: set[str], kind: str) -> None:
    """Refuse keys the format does not have (a different format, or a variant we would silently drop)."""
    unknown = sorted(set(source.keys()) - expected)
    check(not unknown, f"{source.path} has {len(unknown)} tensors that {kind} checkpoints do not have, e.g. "
                       f"{', '.join(unknown[:4])}: is it another format, or a variant of {kind} (biases, QK norms, "
                       "a tied head) that we do not convert?")
