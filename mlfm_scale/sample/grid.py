"""The sampling time grid (MLFM.md, Sampler): γ from high to low noise at quantiles of the training γ law."""
from __future__ import annotations

import torch
from torch import Tensor

from mlfm_scale.errors import UserError
from mlfm_scale.flow.decision import trajectory_end
from mlfm_scale.flow.schedules import GammaSchedule

GRIDS = ("restricted", "paper")


def gamma_at(schedule: GammaSchedule, q: Tensor, gamma_min: float, gamma_max: float, kind: str = "restricted"
             ) -> Tensor:
    """γ (float64, q's shape) at quantiles ``q`` ∈ [0, 1] of the training distribution ``schedule`` (its learned
    active curve included), within ``[gamma_min, gamma_max]``. ``paper``: MLFM.md's quantiles of the whole law,
    clamped to the range. ``restricted``: quantiles of the law restricted to the range (q = 0 is ``gamma_min``),
    so no point is spent on a clamped end. Both the sampler's grid and the flow-map distillation's time pairs
    (train/distill.py) are drawn here, so a distilled model is trained on the times it is sampled at."""
    q = q.to(torch.float64)
    if kind == "paper":
        return schedule.icdf(q).clamp(gamma_min, gamma_max)
    if kind != "restricted":
        raise UserError(f"unknown sampling grid {kind!r}: choose one of {', '.join(GRIDS)}")
    ends = schedule.cdf(torch.tensor([gamma_min, gamma_max], dtype=torch.float64))
    if not float(ends[1] - ends[0]) > 0.0:
        raise UserError(f"the training γ distribution puts no mass on the sampling range [{gamma_min}, {gamma_max}]:"
                        " widen sample.gamma_min / sample.gamma_max")
    return schedule.icdf(ends[0] + q * (ends[1] - ends[0])).clamp(gamma_min, gamma_max)


def gamma_grid(schedule: GammaSchedule, steps: int, gamma_min: float, gamma_max: float,
               kind: str = "restricted") -> Tensor:
    """Tensor[steps + 1] float64, non-increasing: ``γ_k`` = :func:`gamma_at` the quantiles
    ``q = linspace(0.99, 1e-6, steps + 1)``, with the last point ``gamma_min``. With ``paper`` (MLFM.md's grid)
    points beyond the range repeat its ends: steps that move nothing."""
    if steps < 1:
        raise UserError(f"the sampler needs at least one step, got {steps}")
    gamma = gamma_at(schedule, torch.linspace(0.99, 1e-6, steps + 1, dtype=torch.float64), gamma_min, gamma_max,
                     kind)
    gamma[-1] = gamma_min
    return torch.cummin(gamma, dim=0).values


def sampling_range(cfg, window, schedule: GammaSchedule) -> tuple[float, float, str]:
    """(gamma_min, gamma_max, where gamma_min came from) of the sampler settings ``cfg`` (a SampleSection):
    ``gamma_min=auto`` ends trajectories inside the model's decision ``window`` (a DecisionWindow or None) by
    ``flow.decision.trajectory_end``; a number is used as given (``config``)."""
    if cfg.gamma_min != "auto":
        return float(cfg.gamma_min), float(cfg.gamma_max), "config"
    value, source = trajectory_end(window, schedule, cfg.gamma_max)
    return value, float(cfg.gamma_max), source
