"""One inner SDE trajectory of the sampler (MLFM.md, Sampler): the remaining positions travel the bridge from
near the mask embedding to near their clean embeddings, the others held at their clean embeddings.

    z₀ = forward process at t₀ (remaining positions hold the mask id, so their clean guess is m)
    z_{k+1} = sde_step(z_k, x̂0(z_k, γ_k), t_k, t_{k+1}); observed positions reset to e
    logits = f(z_N, γ_N)                                            — N (2N with guidance) + 1 evaluations
"""
from __future__ import annotations

import torch
from torch import Tensor

from mlfm_scale.config import SampleSection
from mlfm_scale.flow.bridge import bridge_forward, sde_step
from mlfm_scale.flow.schedules import bridge_time
from mlfm_scale.sample.denoiser import Denoiser
from mlfm_scale.sample.guidance import guided_posterior_mean


def trajectory_nfe(steps: int, guidance_scale: float) -> int:
    """Network evaluations of one trajectory: N steps (2N with guidance) plus the final forward."""
    return steps * (2 if guidance_scale != 0 else 1) + 1


def sde_trajectory(denoiser: Denoiser, ids: Tensor, remaining: Tensor, prompt: Tensor, segment_ids: Tensor | None,
                   gamma: Tensor, cfg: SampleSection, generator: torch.Generator) -> Tensor:
    """Final logits [b, s, V] of one trajectory over the ``gamma`` grid (Tensor[N + 1], high to low noise).

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
    for k in range(gamma.numel() - 1):
        x0_hat = guided_posterior_mean(denoiser, z, levels[k].expand(b), t[k], e, m, table, prompt, segment_ids,
                                       cfg, generator)
        z = torch.where(hold, sde_step(z, x0_hat, t[k], t[k + 1], sigma, generator), e)
    return denoiser(z, levels[-1].expand(b), segment_ids)
