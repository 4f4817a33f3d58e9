"""One inner SDE trajectory of the sampler (MLFM.md, Sampler): the remaining positions travel the bridge from
near the mask embedding to near their clean embeddings, the others held at their clean embeddings.

    z₀ = forward process at t₀ (remaining positions hold the mask id, so their clean guess is m)
    z_{k+1} = sde_step(z_k, x̂0(z_k, γ_k), t_k, t_{k+1}); observed positions reset to e
    logits = f(z_N, γ_N)                                            — N (2N with guidance) + 1 evaluations
             (guided too with the logits target: one more)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mlfm_scale.config import SampleSection
from mlfm_scale.flow.bridge import Generators, bridge_forward, sde_step
from mlfm_scale.flow.schedules import bridge_time
from mlfm_scale.sample.denoiser import Denoiser
from mlfm_scale.sample.guidance import guidance_passes, guided_logits, guided_posterior_mean


def trajectory_nfe(steps: int, cfg: SampleSection, prompted: Tensor) -> Tensor:
    """Long[b]: network evaluations of one trajectory per row: N steps plus the final forward, and with guidance
    (``cfg.guidance_scale`` ≠ 0) on rows with a prompt (``prompted`` Bool[b]) an unconditional pass per step,
    and one for the final forward with the logits target (rows without a prompt skip them: nothing to hide)."""
    guided = 0 if cfg.guidance_scale == 0 else steps + (1 if cfg.guidance_target == "logits" else 0)
    return steps + 1 + guided * prompted.long()


def confidence_step(steps: int, quantile: float) -> int:
    """The SDE step (0 … steps − 1) whose draw scores a round with ``confidence_source=quantile``:
    ``floor(quantile · steps)``, clamped."""
    return min(max(math.floor(quantile * steps), 0), steps - 1)


def sde_trajectory(denoiser: Denoiser, ids: Tensor, remaining: Tensor, prompt: Tensor, segment_ids: Tensor | None,
                   gamma: Tensor, cfg: SampleSection, generator: Generators, keep_step: int | None = None
                   ) -> tuple[Tensor, Tensor | None]:
    """(final logits, logits of step ``keep_step`` or None) [b, s, V] of one trajectory over the ``gamma`` grid
    (Tensor[N + 1], high to low noise). Both are what tokens are drawn from: guided with the logits target
    (the final forward then takes an unconditional pass too), conditional otherwise.

    ``ids`` Long[b, s]: observed tokens, the mask id on ``remaining`` (Bool[b, s]) positions; ``prompt``
    Bool[b, s] the positions guidance hides in its unconditional pass."""
    e = denoiser.embed(ids)
    m = denoiser.mask_embedding()
    table = denoiser.embedding_table()
    sigma, b = denoiser.sigma, ids.size(0)
    t = bridge_time(gamma, sigma).to(e.device)
    levels = gamma.to(device=e.device, dtype=torch.float32)
    hold = remaining.unsqueeze(-1)
    z = bridge_forward(e, m, t[0], remaining, sigma, generator)
    kept = None
    for k in range(gamma.numel() - 1):
        logits_c, logits_u = guidance_passes(denoiser, z, levels[k].expand(b), t[k], e, m, prompt, segment_ids,
                                             cfg, generator)
        if k == keep_step:
            kept = guided_logits(logits_c, logits_u, cfg)
        x0_hat = guided_posterior_mean(logits_c, logits_u, z, t[k], table, cfg)
        z = torch.where(hold, sde_step(z, x0_hat, t[k], t[k + 1], sigma, generator), e)
    logits_c, logits_u = guidance_passes(denoiser, z, levels[-1].expand(b), t[-1], e, m, prompt, segment_ids, cfg,
                                         generator, unconditional=cfg.guidance_target == "logits")
    return guided_logits(logits_c, logits_u, cfg), kept
