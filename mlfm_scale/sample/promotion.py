"""Online token promotion (MLFM.md, Sampler): alternate SDE trajectories over the remaining positions with the
discrete promotion of their confident tokens, until every position is decided.

Each round: one trajectory → Gumbel-max tokens from its final logits → confidence (of that draw, or with
``confidence_source=quantile`` of a draw at an SDE step part-way along) → promote every remaining position whose
confidence reaches the threshold, and at least ``min_promote``. A threshold of −∞ promotes all in the first
round: the pure flow sampler (one trajectory, every token decoded at its end).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mlfm_scale.config import SampleSection
from mlfm_scale.flow.bridge import Generators, for_rows
from mlfm_scale.sample.canvas import Canvas
from mlfm_scale.sample.denoiser import Denoiser
from mlfm_scale.sample.grid import gamma_grid
from mlfm_scale.sample.state import SampleState
from mlfm_scale.sample.tokens import sample_and_score
from mlfm_scale.sample.trajectory import confidence_step, sde_trajectory, trajectory_nfe

EOS_POLICIES = ("joint", "eos_last", "rank_separately")


def forced_eos_count(need: Tensor, n_eos: Tensor, n_other: Tensor, eos_policy: str) -> Tensor:
    """Long[b, 1]: how many of a row's ``need`` forced picks go to its ``n_eos`` EOS candidates (the rest to its
    ``n_other`` others; all Long[b, 1]; ``need`` ≤ ``n_eos + n_other``). ``rank_separately``: the share
    ``round(need · n_eos / (n_eos + n_other))``, half to even as the reference's Python ``round`` (with one pick,
    EOS only when EOS candidates are more than half). Since ``need`` ≤ the candidates, neither share exceeds its
    group, so the reference's caps and leftover rule change nothing and are left out. Otherwise (``eos_last``;
    ``joint``, which has no EOS group) non-EOS candidates go first."""
    if eos_policy == "rank_separately":
        return torch.round(need.double() * n_eos / (n_eos + n_other).clamp_min(1)).long()
    return (need - n_other).clamp_min(0)


def select_promotions(score: Tensor, remaining: Tensor, is_eos: Tensor, threshold: float, min_promote: int,
                      eos_policy: str = "joint") -> Tensor:
    """Bool[b, s]: the ``remaining`` positions (Bool[b, s]) to promote this round.

    Every remaining position with ``score`` ≥ ``threshold``, then, where a row has fewer than ``min_promote``,
    the shortfall from its other remaining positions (all it has, if fewer), best scores first. ``joint`` ranks
    them together; ``eos_last`` and ``rank_separately`` rank EOS candidates (``is_eos`` Bool[b, s]) and the
    others apart, each group giving its best to its quota (:func:`forced_eos_count`). The reference splits the
    whole ``min_promote`` over every remaining position and joins the result to the threshold's picks, which can
    promote fewer than ``min_promote``; here the split is of the shortfall over the positions not yet picked, so
    a round always promotes at least ``min(min_promote, remaining)``."""
    if eos_policy not in EOS_POLICIES:
        raise ValueError(f"unknown EOS policy {eos_policy!r}: choose one of {', '.join(EOS_POLICIES)}")
    passes = remaining & (score >= threshold)
    need = (min_promote - passes.sum(dim=1, keepdim=True)).clamp_min(0)
    candidate = remaining & ~passes
    eos = candidate & is_eos if eos_policy != "joint" else torch.zeros_like(candidate)
    n_eos = eos.sum(dim=1, keepdim=True)
    n_other = candidate.sum(dim=1, keepdim=True) - n_eos
    eos_quota = forced_eos_count(need, n_eos, n_other, eos_policy)
    # candidates by score, then grouped (others first, EOS after): a candidate's place minus its group's start
    # is its rank within the group
    order = torch.argsort(torch.where(candidate, score.float(), float("-inf")), dim=1, descending=True, stable=True)
    group = torch.where(candidate, eos.long(), 2)
    order = order.gather(1, torch.argsort(group.gather(1, order), dim=1, stable=True))
    places = torch.arange(score.size(1), device=score.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, places) - torch.where(eos, n_other, 0)
    return passes | (candidate & (rank < torch.where(eos, eos_quota, need - eos_quota)))


def sde_round_nfe(cfg: SampleSection, prompted: Tensor) -> Tensor:
    """Long[b]: one round's evaluations per row with an SDE trajectory of ``cfg.steps`` steps."""
    return trajectory_nfe(cfg.steps, cfg, prompted)


def promotion_sample(denoiser: Denoiser, canvas: Canvas, state: SampleState, cfg: SampleSection, threshold: float,
                     banned: Tensor, generator: Generators, trajectory: Callable = sde_trajectory,
                     round_nfe: Callable[[SampleSection, Tensor], Tensor] = sde_round_nfe) -> None:
    """Fill ``state`` by rounds of trajectory + promotion; finished rows leave the batch (and stop counting NFE).
    ``trajectory`` (``sde_trajectory``'s arguments; returns the final logits and those of the ``keep_step``-th
    step first) and ``round_nfe`` make a round: the SDE's, or a flow map's jumps (sample/flowmap.py). A round
    draws from the active rows' own streams when ``generator`` holds one per row."""
    gamma = gamma_grid(denoiser.gamma_schedule(), cfg.steps, cfg.gamma_min, cfg.gamma_max, cfg.grid)
    keep_step = confidence_step(cfg.steps, cfg.confidence_quantile) if cfg.confidence_source == "quantile" else None

    def draw(logits: Tensor, streams: Generators) -> tuple[Tensor, Tensor]:
        return sample_and_score(logits, cfg.temperature, cfg.top_p, banned, cfg.confidence, streams,
                                cfg.confidence_temperature)

    while (rows := state.active()).numel():
        sub, remaining, streams = canvas.rows(rows), state.remaining[rows], for_rows(generator, rows)
        logits, step_logits = trajectory(denoiser, state.ids[rows], remaining, sub.prompt, sub.segment_ids,
                                         gamma, cfg, streams, keep_step)
        tokens, score = draw(logits, streams)
        if step_logits is not None:  # quantile: the token from the end, scored by the mid-trajectory draw's own
            score = draw(step_logits, streams)[1]
        chosen = select_promotions(score, remaining, tokens == denoiser.eos_id, threshold, cfg.min_promote,
                                   cfg.eos_policy)
        state.commit(rows, chosen, tokens, round_nfe(cfg, sub.prompt.any(dim=1)), score)
