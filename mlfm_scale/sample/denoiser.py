"""What the sampler needs from a network, and the adapter that gives it a training-time megatron model.

The sampler talks to a *denoiser*: the inference model (``mlfm_scale.inference.MLFMForInference``) already is
one; :class:`ModelDenoiser` wraps the training network (``MLFMModel``, tensor-parallel size 1). A flow-map
student (``flow_map`` true, ``mlfm distill``) also takes the jump's target γ_t; a denoiser without ``flow_map``
need not accept one. Shapes: b rows, s positions, d embedding width, V the real vocabulary (no padding rows).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from mlfm_scale.errors import UserError
from mlfm_scale.flow.decision import DecisionWindow
from mlfm_scale.flow.schedules import GammaSchedule


class Denoiser(Protocol):
    """``denoiser(z [b, s, d], γ [b], segment_ids [b, s] | None) → logits [b, s, V]`` plus the embedding space;
    a flow-map student's logits are its estimate for the jump from γ to ``gamma_target`` γ_t [b] (default γ)."""

    mask_id: int
    eos_id: int
    pad_id: int
    sigma: float
    vocab_size: int
    seq_len: int

    def __call__(self, z: Tensor, gamma: Tensor, segment_ids: Tensor | None = None,
                 gamma_target: Tensor | None = None) -> Tensor: ...

    def embed(self, ids: Tensor) -> Tensor: ...

    def mask_embedding(self) -> Tensor: ...

    def embedding_table(self) -> Tensor: ...

    def gamma_schedule(self) -> GammaSchedule: ...

    def decision_window(self) -> DecisionWindow | None: ...


class ModelDenoiser:
    """A training ``MLFMModel`` (tensor-parallel size 1: its logits and table hold the whole padded vocabulary)
    as a :class:`Denoiser`; logits and table are cut to the real vocabulary."""

    def __init__(self, model, vocab_size: int, mask_id: int, eos_id: int, pad_id: int, sigma: float, seq_len: int,
                 schedule: GammaSchedule, window: DecisionWindow | None = None):
        if model.config.tensor_model_parallel_size != 1:
            raise UserError("in-training sampling needs the whole vocabulary on one rank (parallel.tp=1); "
                            "sample from an export (mlfm sample --model) for tensor-parallel runs")
        self.model, self.schedule, self.window = model, schedule, window
        self.vocab_size, self.mask_id, self.eos_id, self.pad_id = vocab_size, mask_id, eos_id, pad_id
        self.sigma, self.seq_len = sigma, seq_len

    @property
    def flow_map(self) -> bool:
        return self.model.cfg.flow_map

    def __call__(self, z: Tensor, gamma: Tensor, segment_ids: Tensor | None = None,
                 gamma_target: Tensor | None = None) -> Tensor:
        return self.model(z, gamma, segment_ids, gamma_target)[..., : self.vocab_size]

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.embed(ids)

    def mask_embedding(self) -> Tensor:
        return self.model.mask_embedding(self.mask_id)

    def embedding_table(self) -> Tensor:
        return self.model.embedding_table()[: self.vocab_size]

    def gamma_schedule(self) -> GammaSchedule:
        return self.schedule

    def decision_window(self) -> DecisionWindow | None:
        return self.window


def evaluate(denoiser: Denoiser, z: Tensor, gamma: Tensor, segment_ids: Tensor | None = None,
             gamma_target: Tensor | None = None) -> Tensor:
    """``denoiser``'s logits [b, s, V]; the jump target γ_t [b] is passed only when given, so a denoiser without
    one (not a flow map) keeps its three-argument call."""
    if gamma_target is None:
        return denoiser(z, gamma, segment_ids)
    return denoiser(z, gamma, segment_ids, gamma_target=gamma_target)


def device_of(denoiser: Denoiser) -> torch.device:
    return denoiser.embedding_table().device
