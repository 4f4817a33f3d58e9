"""Online token promotion (MLFM.md, Sampler): alternate SDE trajectories over the remaining positions with the
discrete promotion of their confident tokens, until every position is decided.

Each round: one trajectory → Gumbel-max tokens from its final logits → confidence → promote every remaining
position whose confidence reaches the threshold, and at least ``min_promote``. A threshold of −∞ promotes all
in the first round: the pure flow sampler (one trajectory, every token decoded at its end).
"""
from __future__ import annotations

import torch
from torch import Tensor

from mlfm_scale.config import SampleSection
from mlfm_scale.sample.canvas import Canvas
from mlfm_scale.sample.denoiser import Denoiser
from mlfm_scale.sample.grid import gamma_grid
from mlfm_scale.sample.state import SampleState
from mlfm_scale.sample.tokens import sample_and_score
from mlfm_scale.sample.trajectory import sde_trajectory, trajectory_nfe

EOS_POLICIES = ("joint", "eos_last")


def select_promotions(score: Tensor, remaining: Tensor, is_eos: Tensor, threshold: float, min_promote: int,
                      eos_policy: str = "joint") -> Tensor:
    """Bool[b, s]: the ``remaining`` positions (Bool[b, s]) to promote this round.

    Every remaining position with ``score`` ≥ ``threshold``, then, where a row has fewer than ``min_promote``,
    its best-scoring other remaining positions up to that count (all it has, if fewer). With ``eos_last`` those
    forced picks take non-EOS candidates (``is_eos`` Bool[b, s]) before EOS ones."""
    if eos_policy not in EOS_POLICIES:
        raise ValueError(f"unknown EOS policy {eos_policy!r}: choose one of {', '.join(EOS_POLICIES)}")
    passes = remaining & (score >= threshold)
    need = (min_promote - passes.sum(dim=1, keepdim=True)).clamp_min(0)
    candidate = remaining & ~passes
    order = torch.argsort(torch.where(candidate, score.float(), float("-inf")), dim=1, descending=True, stable=True)
    tier = torch.where(candidate, (is_eos & candidate).long() if eos_policy == "eos_last" else 0, 2).long()
    order = order.gather(1, torch.argsort(tier.gather(1, order), dim=1, stable=True))
    rank = torch.arange(score.size(1), device=score.device).expand_as(score)
    forced = torch.zeros_like(passes).scatter(1, order, rank < need) & candidate
    return passes | forced


def promotion_sample(denoiser: Denoiser, canvas: Canvas, state: SampleState, cfg: SampleSection, threshold: float,
                     banned: Tensor, generator: torch.Generator) -> None:
    """Fill ``state`` by rounds of trajectory + promotion; finished rows leave the batch (and stop counting NFE)."""
    gamma = gamma_grid(denoiser.gamma_schedule(), cfg.steps, cfg.gamma_min, cfg.gamma_max, cfg.grid)
    cost = trajectory_nfe(cfg.steps, cfg.guidance_scale)
    while (rows := state.active()).numel():
        sub, remaining = canvas.rows(rows), state.remaining[rows]
        logits = sde_trajectory(denoiser, state.ids[rows], remaining, sub.prompt, sub.segment_ids, gamma, cfg,
                                generator)
        tokens, score = sample_and_score(logits, cfg.temperature, cfg.top_p, banned, cfg.confidence, generator)
        chosen = select_promotions(score, remaining, tokens == denoiser.eos_id, threshold, cfg.min_promote,
                                   cfg.eos_policy)
        state.commit(rows, chosen, tokens, cost, score)
