"""The velocity objective through its clean-data parameterisation (MLFM.md, "Loss").

Shapes: B sequences, L positions, V vocabulary entries, d embedding width. Cross-entropies are in nats and
computed in float32 or wider. Positions outside the corrupted set contribute nothing, whatever their CE holds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mlfm_scale.flow.bridge import broadcast_time

REDUCTIONS = ("inverse_count", "inverse_p", "none")


def _wide(x: Tensor) -> Tensor:
    """x in its floating dtype promoted to at least float32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def per_position_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy Tensor[B, L] float32 (or wider) of ``logits`` [B, L, V] against ``targets`` Long[B, L]."""
    logits = _wide(logits)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)


def posterior_mean_embedding(logits: Tensor, table: Tensor) -> Tensor:
    """x̂0 = softmax(logits)·E: Tensor[..., d] in float32 or wider. ``logits`` [..., V], ``table`` E [V, d]."""
    probs = torch.softmax(_wide(logits), dim=-1)
    return probs @ table.to(probs.dtype)


def velocity(x0_hat: Tensor, z: Tensor, t: Tensor | float) -> Tensor:
    """v = (x̂0 − z)/(1 − t): Tensor[B, L, d]; t is a scalar or Tensor[B] with t < 1."""
    return (x0_hat - z) / (1 - broadcast_time(t, z))


def velocity_mse_weight(t: Tensor) -> Tensor:
    """1/(1 − t)², same shape as t: velocity MSE ‖v̂ − v*‖² = this × ‖x̂0 − e‖² at each position."""
    return 1.0 / (1.0 - t) ** 2


def masked_loss(values: Tensor, corrupted: Tensor, p: Tensor, valid: Tensor, reduction: str = "inverse_count"
                ) -> Tensor:
    """Scalar reduction of per-position losses ``values`` [B, L] (CE in nats, or the x̂0 MSE) over the corrupted
    set C = corrupted ∧ valid; masks Bool[B, L], p: Tensor[B].

    - ``inverse_count``: mean over rows with |C_b| ≥ 1 of ``Σ_{i∈C_b} v_i / |C_b|``.
    - ``inverse_p``: ``Σ_b Σ_{i∈C_b} v_i / p_b`` ÷ ``Σ_b #valid_b`` (the batch's valid positions).
    - ``none``: the plain mean over all corrupted positions of the batch.
    A batch with nothing to reduce gives 0 (still connected to the graph).
    """
    chosen = corrupted & valid
    masked = torch.where(chosen, values, 0.0)
    if reduction == "inverse_count":
        per_row, rows = masked.sum(dim=1) / chosen.sum(dim=1).clamp_min(1), chosen.any(dim=1)
        return torch.where(rows, per_row, 0.0).sum() / rows.sum().clamp_min(1)
    if reduction == "inverse_p":
        return (masked.sum(dim=1) / p.to(masked.dtype)).sum() / valid.sum().clamp_min(1)
    if reduction == "none":
        return masked.sum() / chosen.sum().clamp_min(1)
    raise ValueError(f"unknown loss reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")


def sft_loss(values: Tensor, corrupted: Tensor, p: Tensor, response: Tensor) -> Tensor:
    """LLaDA-style SFT reduction of per-position losses ``values`` [B, L], scalar:
    ``(1/B) Σ_b Σ_{i∈C_b} v_i / (p_b·|response_b|)`` with C_b = corrupted ∧ response. ``corrupted``, ``response``:
    Bool[B, L]; ``p``: Tensor[B] > 0. Rows with an empty response add 0 but still count in B."""
    chosen = corrupted & response
    per_row = torch.where(chosen, values, 0.0).sum(dim=1) / (p.to(values.dtype) * response.sum(dim=1).clamp_min(1))
    return per_row.mean()


def embedding_mse(x0_hat: Tensor, e: Tensor) -> Tensor:
    """Per-position ``mean_d (x̂0 − e)²``: Tensor[B, L] (float32 or wider), reduced like the CE by the caller.
    ``x0_hat``, ``e``: Tensor[B, L, d]."""
    return (_wide(x0_hat) - e).square().mean(dim=-1)


@torch.no_grad()
def token_diagnostics(logits: Tensor, targets: Tensor, corrupted: Tensor, ce: Tensor | None = None
                      ) -> dict[str, Tensor]:
    """Per-sequence means over the corrupted positions, each Tensor[B] float32 (NaN for a row with none):
    ``ce`` (nats), ``accuracy`` (argmax = target), ``confidence`` (max probability), ``entropy`` (nats).

    ``logits`` [B, L, V], ``targets`` Long[B, L], ``corrupted`` Bool[B, L]; pass ``ce`` [B, L] if already known.
    """
    log_probs = torch.log_softmax(_wide(logits), dim=-1)
    if ce is None:
        ce = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    max_log_prob, predicted = log_probs.max(dim=-1)
    per_position = {
        "ce": ce.float(),
        "accuracy": (predicted == targets).float(),
        "confidence": max_log_prob.exp().float(),
        "entropy": torch.special.entr(log_probs.exp()).sum(dim=-1).float(),
    }
    count = corrupted.sum(dim=1)
    return {name: torch.where(corrupted, value, 0.0).sum(dim=1) / count for name, value in per_position.items()}
