"""The two baselines, through the sampler's interface and with the same network (MLFM.md, Why / Sampler).

- ``flow``: one SDE trajectory, every token decoded at its end (promotion with threshold −∞).
- ``mdm``: discrete ancestral unmasking as a masked diffusion model: the network sees ``z = m`` on masked
  positions at the objective's MDM level γ = γ_max of the training range; over K steps each still-masked
  position is revealed with probability ``1/(K − k)`` at step k (a linear unmasking schedule, all by the last),
  its token drawn per position from the logits (the factorised step). Which positions reveal is drawn before
  the network runs, so a row revealing nothing that step costs no evaluation. Every row draws its reveal
  uniforms at every step until the batch is done (a finished row's draws change nothing), so with per-row
  streams a row's draws do not depend on when the others finish.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mlfm_scale.config import SampleSection
from mlfm_scale.flow.bridge import Generators, for_rows, uniform
from mlfm_scale.sample.canvas import Canvas
from mlfm_scale.sample.denoiser import Denoiser
from mlfm_scale.sample.promotion import promotion_sample
from mlfm_scale.sample.state import SampleState
from mlfm_scale.sample.tokens import sample_and_score


def flow_sample(denoiser: Denoiser, canvas: Canvas, state: SampleState, cfg: SampleSection, banned: Tensor,
                generator: Generators) -> None:
    """Pure flow decoding: one trajectory of ``cfg.steps`` steps, then every remaining token at once."""
    promotion_sample(denoiser, canvas, state, cfg, float("-inf"), banned, generator)


def mdm_sample(denoiser: Denoiser, canvas: Canvas, state: SampleState, cfg: SampleSection, banned: Tensor,
               generator: Generators) -> None:
    """Ancestral unmasking in ``cfg.steps`` steps; at most one evaluation per row and step."""
    gamma = float(denoiser.gamma_schedule().gamma_max)
    steps = cfg.steps
    for k in range(steps):
        if not bool(state.remaining.any()):
            return
        u = uniform(state.remaining.shape, generator, state.remaining.device)
        reveal = state.remaining & (u < 1.0 / (steps - k))
        rows = reveal.any(dim=1).nonzero().flatten()
        if not rows.numel():
            continue
        z = denoiser.embed(state.ids[rows])  # the mask id on masked positions: z = m there, e elsewhere
        levels = torch.full((rows.numel(),), gamma, device=z.device)
        logits = denoiser(z, levels, canvas.rows(rows).segment_ids)
        tokens, score = sample_and_score(logits, cfg.temperature, cfg.top_p, banned, cfg.confidence,
                                         for_rows(generator, rows), cfg.confidence_temperature)
        state.commit(rows, reveal[rows], tokens, 1, score)
