"""The flow map of the bridge's probability-flow ODE (MLFM.md, "Flow-map distillation").

For a fixed clean estimate D = p·E (p a distribution over the vocabulary), the ODE with drift
``flow.bridge.flow_drift`` is integrated exactly from bridge time s to t by

    X_{s,t}(z) = (1−t)·m + t·D + r_{st}·(z − (1−s)·m − s·D),      r_{st} = √(t(1−t) / (s(1−s)))

Composing two exact half-jumps s → u → t with estimates D₁, D₂ equals one jump with D* = w₁·D₁ + w₂·D₂, where
``w₁ = (u·r_{ut} − s·r_{st}) / (t − s·r_{st})`` and ``w₂ = (t − u·r_{ut}) / (t − s·r_{st})`` (both ≥ 0 for
s < u < t, summing to 1): the distillation target. Times are scalars or Tensor[B] in (0, 1); coefficients are
computed in float64 (r_{st} is large near s = 0) and the state stays float32 or wider, as in flow/bridge.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mlfm_scale.flow.bridge import broadcast_time


def jump_ratio(s: Tensor | float, t: Tensor | float) -> Tensor:
    """r_{st} = √(t(1−t) / (s(1−s))), float64, the shape of s and t broadcast."""
    s, t = torch.as_tensor(s, dtype=torch.float64), torch.as_tensor(t, dtype=torch.float64)
    return torch.sqrt(t * (1 - t) / (s * (1 - s)))


def flow_map(z: Tensor, d: Tensor, m: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
    """X_{s,t}(z) [B, …, d]: z [B, …, d] at time s carried to time t along the flow with clean estimate
    ``d`` [B, …, d] (D = p·E); ``m`` [d] the mask embedding. float32 or wider, like z."""
    wide = torch.promote_types(z.dtype, torch.float32)
    z, d, m = z.to(wide), d.to(wide), m.to(wide)
    r = broadcast_time(jump_ratio(s, t), z).to(wide)
    s, t = broadcast_time(torch.as_tensor(s, dtype=torch.float64), z).to(wide), \
        broadcast_time(torch.as_tensor(t, dtype=torch.float64), z).to(wide)
    return (1 - t) * m + t * d + r * (z - (1 - s) * m - s * d)


def composition_weights(s: Tensor | float, u: Tensor | float, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """(w₁, w₂) float64: X_{u,t}(X_{s,u}(z; D₁); D₂) = X_{s,t}(z; w₁·D₁ + w₂·D₂) for s ≤ u ≤ t, s < t."""
    s, u, t = (torch.as_tensor(x, dtype=torch.float64) for x in (s, u, t))
    r_st, r_ut = jump_ratio(s, t), jump_ratio(u, t)
    denominator = t - s * r_st
    return (u * r_ut - s * r_st) / denominator, (t - u * r_ut) / denominator
