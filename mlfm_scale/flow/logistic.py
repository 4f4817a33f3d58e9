"""Least-squares fit of the generalised logistic ``F(x) = sigmoid((x − loc)/s)^k`` (Levenberg–Marquardt).

The active γ curve (MLFM.md, "γ schedules") fits this shape to its normalised cross-entropy curve and uses the
fit as a CDF over γ; :func:`generalised_logistic_inverse` turns the fit into quantiles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import logsigmoid


@dataclass(frozen=True)
class LogisticFit:
    """Fitted ``loc`` and ``scale`` (units of x), ``power`` k > 0, and the fit's R² on the data it saw."""

    loc: float
    scale: float
    power: float
    r2: float


def generalised_logistic(x: Tensor, loc: float, scale: float, power: float) -> Tensor:
    """``sigmoid((x − loc)/scale)^power`` evaluated as ``exp(power · logsigmoid(·))``; same shape as x."""
    return torch.exp(power * logsigmoid((x - loc) / scale))


def generalised_logistic_inverse(y: Tensor, loc: float, scale: float, power: float) -> Tensor:
    """The x with ``generalised_logistic(x) = y`` for y in (0, 1); ±inf at y = 0 / 1."""
    log_sig = torch.log(y) / power  # log sigmoid(z)
    return loc + scale * (log_sig - torch.log(-torch.expm1(log_sig)))  # z = logit(exp(log_sig))


def fit_generalised_logistic(x: Tensor, y: Tensor, iterations: int = 200, weights: Tensor | None = None
                             ) -> LogisticFit | None:
    """Fit (loc, log scale, log power) to points ``(x, y)`` (1-D, same length, y roughly in [0, 1]), each point
    weighted by ``weights`` (e.g. its example count; default 1).

    Weighted Levenberg–Marquardt in float64 with an analytic Jacobian, started at the x where y is nearest 0.5, a
    scale of a sixteenth of the x range and power 1. Returns None when there are fewer than 4 points, y is
    constant, or the fit is not finite; otherwise the fit and its weighted R² = 1 − SSE_w/SST_w.
    """
    x, y = x.detach().to(torch.float64).flatten(), y.detach().to(torch.float64).flatten()
    w = torch.ones_like(x) if weights is None else weights.detach().to(torch.float64).flatten()
    root_w = (w / w.sum()).sqrt()
    if x.numel() < 4 or float(y.max() - y.min()) <= 0.0:
        return None
    width = float(x.max() - x.min())
    lower = torch.tensor([float(x.min()) - width, math.log(1e-4 * width), -5.0], dtype=torch.float64)
    upper = torch.tensor([float(x.max()) + width, math.log(10.0 * width), 5.0], dtype=torch.float64)
    theta = torch.tensor([float(x[(y - 0.5).abs().argmin()]), math.log(width / 16), 0.0], dtype=torch.float64)

    def residual_and_jacobian(theta: Tensor) -> tuple[Tensor, Tensor]:
        loc, scale, power = theta[0], theta[1].exp(), theta[2].exp()
        z = (x - loc) / scale
        log_sig = logsigmoid(z)
        f = torch.exp(power * log_sig)
        d_z = f * power * torch.sigmoid(-z)  # ∂f/∂z
        jac = torch.stack([-d_z / scale, -d_z * z, f * log_sig * power], dim=1)
        return root_w * (y - f), root_w[:, None] * jac

    residual, jac = residual_and_jacobian(theta)
    sse, damping = float(residual.square().sum()), 1e-3
    for _ in range(iterations):
        jtj, jtr = jac.T @ jac, jac.T @ residual
        try:
            step = torch.linalg.solve(jtj + damping * torch.diag(jtj.diagonal().clamp_min(1e-12)), jtr)
        except torch.linalg.LinAlgError:  # saturated columns (all points on a flat tail): damp harder
            damping *= 3
            continue
        candidate = torch.minimum(torch.maximum(theta + step, lower), upper)
        cand_residual, cand_jac = residual_and_jacobian(candidate)
        cand_sse = float(cand_residual.square().sum())
        if cand_sse < sse:  # the damping's floor keeps the system solvable after many good steps
            theta, residual, jac, sse = candidate, cand_residual, cand_jac, cand_sse
            damping = max(damping / 3, 1e-9)
        else:
            damping *= 3
        if damping > 1e12:
            break
    mean = float((w * y).sum() / w.sum())
    r2 = 1.0 - sse / float((root_w * (y - mean)).square().sum())
    if not (math.isfinite(r2) and bool(torch.isfinite(theta).all())):
        return None
    return LogisticFit(loc=float(theta[0]), scale=float(theta[1].exp()), power=float(theta[2].exp()), r2=r2)
