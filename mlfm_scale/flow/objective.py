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


def masked_ce_loss(ce: Tensor, corrupted: Tensor, p: Tensor, valid: Tensor, reduction: str = "inverse_count"
                   ) -> Tensor:
    """Cross-entropy on the corrupted set C = corrupted ∧ valid. ``ce``: Tensor[B, L]; masks Bool[B, L]; p: [B].

    - ``inverse_count`` (scalar): mean over rows with |C_b| ≥ 1 of ``Σ_{i∈C_b} CE_i / |C_b|``.
    - ``inverse_p`` (scalar): mean over rows with ≥ 1 valid position of ``Σ_{i∈C_b} CE_i / (p_b · #valid_b)``.
    - ``none``: Tensor[B, L], CE on C and 0 elsewhere.
    A scalar reduction over a batch with no qualifying row is 0 (still connected to the graph).
    """
    chosen = corrupted & valid
    masked = torch.where(chosen, ce, 0.0)
    if reduction == "none":
        return masked
    if reduction == "inverse_count":
        per_row, rows = masked.sum(dim=1) / chosen.sum(dim=1).clamp_min(1), chosen.any(dim=1)
    elif reduction == "inverse_p":
        per_row = masked.sum(dim=1) / (p.to(masked.dtype) * valid.sum(dim=1).clamp_min(1))
        rows = valid.any(dim=1)
    else:
        raise ValueError(f"unknown CE reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    return torch.where(rows, per_row, 0.0).sum() / rows.sum().clamp_min(1)


def sft_ce_loss(ce: Tensor, corrupted: Tensor, p: Tensor, response: Tensor) -> Tensor:
    """LLaDA-style SFT loss, scalar: ``(1/B) Σ_b Σ_{i∈C_b} CE_i / (p_b·|response_b|)`` with C_b = corrupted ∧
    response. ``ce``: Tensor[B, L]; ``corrupted``, ``response``: Bool[B, L]; ``p``: Tensor[B] > 0. Rows with an
    empty response add 0 but still count in B."""
    chosen = corrupted & response
    per_row = torch.where(chosen, ce, 0.0).sum(dim=1) / (p.to(ce.dtype) * response.sum(dim=1).clamp_min(1))
    return per_row.mean()


def embedding_mse(x0_hat: Tensor, e: Tensor, corrupted: Tensor) -> Tensor:
    """Scalar: mean over corrupted positions (all rows pooled) of ``mean_d (x̂0 − e)²``; 0 if none is corrupted.
    ``x0_hat``, ``e``: Tensor[B, L, d]; ``corrupted``: Bool[B, L]."""
    per_position = (_wide(x0_hat) - e).square().mean(dim=-1)
    return torch.where(corrupted, per_position, 0.0).sum() / corrupted.sum().clamp_min(1)


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
