"""Classifier-free guidance for the bridge (MLFM.md, Sampler): a conditional and an unconditional pass combined
into one posterior-mean embedding x̂0 [b, s, d] (float32 or wider).

The unconditional pass sees the prompt as unobserved: ``corrupt`` mode re-draws the prompt positions from the
forward process at the current t, ``mask`` mode puts the mask embedding m there. Targets: ``velocity``
``v = v_c + s·(v_c − v_u)``, ``x̂0 = z + (1 − t)·v``; ``logits`` ``log p_c + s·(log p_c − log p_u)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mlfm_scale.config import SampleSection
from mlfm_scale.flow.bridge import bridge_forward
from mlfm_scale.flow.objective import posterior_mean_embedding, velocity
from mlfm_scale.sample.denoiser import Denoiser

GUIDANCE_MODES = ("corrupt", "mask")


def unconditional_input(z: Tensor, e: Tensor, m: Tensor, prompt: Tensor, t: Tensor, mode: str, sigma: float,
                        generator: torch.Generator) -> Tensor:
    """z [b, s, d] with the ``prompt`` positions (Bool[b, s]) hidden: re-corrupted at bridge time ``t`` from their
    clean embeddings ``e`` (``corrupt``), or set to the mask embedding ``m`` [d] (``mask``)."""
    if mode == "corrupt":
        hidden = bridge_forward(e, m, t, prompt, sigma, generator)
    elif mode == "mask":
        hidden = m.to(z.dtype).expand_as(z)
    else:
        raise ValueError(f"unknown guidance mode {mode!r}: choose one of {', '.join(GUIDANCE_MODES)}")
    return torch.where(prompt.unsqueeze(-1), hidden.to(z.dtype), z)


def guided_posterior_mean(denoiser: Denoiser, z: Tensor, gamma: Tensor, t: Tensor, e: Tensor, m: Tensor,
                          table: Tensor, prompt: Tensor, segment_ids: Tensor | None, cfg: SampleSection,
                          generator: torch.Generator) -> Tensor:
    """x̂0 [b, s, d] at γ [b] (bridge time ``t``, a scalar tensor): one network pass, two with guidance
    (``cfg.guidance_scale`` ≠ 0). ``e`` [b, s, d] clean embeddings of the observed tokens, ``table`` E [V, d]."""
    logits = denoiser(z, gamma, segment_ids)
    scale = cfg.guidance_scale
    if scale == 0:
        return posterior_mean_embedding(logits, table)
    z_u = unconditional_input(z, e, m, prompt, t, cfg.guidance_mode, denoiser.sigma, generator)
    logits_u = denoiser(z_u, gamma, segment_ids)
    if cfg.guidance_target == "logits":
        log_c, log_u = torch.log_softmax(logits.float(), -1), torch.log_softmax(logits_u.float(), -1)
        return posterior_mean_embedding(log_c + scale * (log_c - log_u), table)
    v_c = velocity(posterior_mean_embedding(logits, table), z, t)
    v_u = velocity(posterior_mean_embedding(logits_u, table), z, t)
    return z + (1 - t) * (v_c + scale * (v_c - v_u))
