"""The sampling time grid (MLFM.md, Sampler): γ from high to low noise at quantiles of the training γ law."""
from __future__ import annotations

import torch
from torch import Tensor

from mlfm_scale.errors import UserError
from mlfm_scale.flow.schedules import GammaSchedule


def gamma_grid(schedule: GammaSchedule, steps: int, gamma_min: float, gamma_max: float) -> Tensor:
    """Tensor[steps + 1] float64, non-increasing: ``γ_k = icdf(q_k)`` for ``q = linspace(0.99, 1e-6, steps + 1)``
    of the training distribution ``schedule`` (its learned active curve included), clamped to
    ``[gamma_min, gamma_max]``, with the last point ``gamma_min``."""
    if steps < 1:
        raise UserError(f"the sampler needs at least one step, got {steps}")
    q = torch.linspace(0.99, 1e-6, steps + 1, dtype=torch.float64)
    gamma = schedule.icdf(q).clamp(gamma_min, gamma_max)
    gamma[-1] = gamma_min
    return torch.cummin(gamma, dim=0).values

