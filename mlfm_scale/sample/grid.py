"""The sampling time grid (MLFM.md, Sampler): γ from high to low noise at quantiles of the training γ law."""
from __future__ import annotations

import torch
from torch import Tensor

from mlfm_scale.errors import UserError
from mlfm_scale.flow.schedules import GammaSchedule


def gamma_grid(schedule: GammaSchedule, steps: int, gamma_min: float, gamma_max: float) -> Tensor:
    """Tensor[steps + 1] float64, decreasing: ``γ_k = icdf(q_k)`` for ``q = linspace(0.99, 1e-6, steps + 1)`` of
    the training distribution ``schedule`` (its learned active curve included) restricted to the sampling range
    ``[gamma_min, gamma_max]``, with the last point ``gamma_min``. Restricting (rather than clamping the
    training quantiles) keeps every step inside the range, so none is spent on a repeated clamped point."""
    if steps < 1:
        raise UserError(f"the sampler needs at least one step, got {steps}")
    ends = schedule.cdf(torch.tensor([gamma_min, gamma_max], dtype=torch.float64))
    if not float(ends[1] - ends[0]) > 0.0:
        raise UserError(f"the training γ distribution puts no mass on the sampling range [{gamma_min}, {gamma_max}]:"
                        " widen sample.gamma_min / sample.gamma_max")
    q = torch.linspace(0.99, 1e-6, steps + 1, dtype=torch.float64)
    gamma = schedule.icdf(ends[0] + q * (ends[1] - ends[0])).clamp(gamma_min, gamma_max)
    gamma[-1] = gamma_min
    return torch.cummin(gamma, dim=0).values
