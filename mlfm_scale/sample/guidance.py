"""Classifier-free guidance for the bridge (MLFM.md, Sampler): a conditional and an unconditional pass combined
into one posterior-mean embedding x̂0 [b, s, d] (float32 or wider), and into the logits tokens are drawn from.

The unconditional pass sees the prompt as unobserved: ``corrupt`` mode re-draws the prompt positions from the
forward process at the current t, ``mask`` mode puts the mask embedding m there, ``drop`` mode removes them
(the rest of the row runs alone, left-packed so its RoPE positions start at 0). A row without a prompt has
nothing to hide: its unconditional pass would repeat the conditional one, so it is not run and the guidance
term ``s·(c − u)`` is zero there. Targets: ``velocity`` ``v = v_c + s·(v_c − v_u)``, ``x̂0 = z + (1 − t)·v``
(tokens come from the conditional logits); ``logits`` ``log p_c + s·(log p_c − log p_u)`` for x̂0 and tokens.
A flow-map student's passes both take the jump's target γ_t (``gamma_target``; None for other denoisers).
"""
from __future__ import annotations

import torch
from torch import Tensor

from mlfm_scale.config import SampleSection
from mlfm_scale.flow.bridge import Generators, bridge_forward, for_rows
from mlfm_scale.flow.objective import posterior_mean_embedding, velocity
from mlfm_scale.sample.denoiser import Denoiser, evaluate

GUIDANCE_MODES = ("corrupt", "mask", "drop")


def unconditional_input(z: Tensor, e: Tensor, m: Tensor, prompt: Tensor, t: Tensor, mode: str, sigma: float,
                        generator: Generators) -> Tensor:
    """z [b, s, d] with the ``prompt`` positions (Bool[b, s]) hidden: re-corrupted at bridge time ``t`` from their
    clean embeddings ``e`` (``corrupt``), or set to the mask embedding ``m`` [d] (``mask``)."""
    if mode == "corrupt":
        hidden = bridge_forward(e, m, t, prompt, sigma, generator)
    elif mode == "mask":
        hidden = m.to(z.dtype).expand_as(z)
    else:
        raise ValueError(f"guidance mode {mode!r} does not hide the prompt in place: choose corrupt or mask")
    return torch.where(prompt.unsqueeze(-1), hidden.to(z.dtype), z)


def packed_order(keep: Tensor) -> tuple[Tensor, Tensor]:
    """(index Long[b, w], valid Bool[b, w]), w the most ``keep`` (Bool[b, s]) positions of any row: row b's kept
    positions in order (valid), then, to fill the width, some of its other positions (not valid)."""
    counts = keep.sum(dim=1, keepdim=True)
    width = int(counts.max())
    index = torch.argsort((~keep).long(), dim=1, stable=True)[:, :width]
    return index, torch.arange(width, device=keep.device) < counts


def dropped_prompt_logits(denoiser: Denoiser, z: Tensor, gamma: Tensor, keep: Tensor, fallback: Tensor,
                          gamma_target: Tensor | None = None) -> Tensor:
    """Logits [b, s, V] of the network on each row's ``keep`` positions (Bool[b, s]) of z [b, s, d] alone, at
    their places; the other positions hold ``fallback`` [b, s, V]. The kept positions are left-packed, so their
    RoPE positions start at 0 as for a sequence without the rest, and the packed rows' tails are padding in a
    segment of their own (segment 1), which the kept positions never attend to."""
    index, valid = packed_order(keep)
    pad = denoiser.embed(torch.tensor(denoiser.pad_id, device=z.device)).to(z.dtype)
    packed = torch.where(valid.unsqueeze(-1), z.gather(1, index.unsqueeze(-1).expand(-1, -1, z.size(-1))), pad)
    logits = evaluate(denoiser, packed, gamma, None if bool(valid.all()) else (~valid).long(), gamma_target)
    places = index.unsqueeze(-1).expand(-1, -1, logits.size(-1))
    # a padding slot writes back the fallback of the position it stands for (index holds distinct positions)
    logits = torch.where(valid.unsqueeze(-1), logits, fallback.gather(1, places))
    return fallback.scatter(1, places, logits)


def unconditional_logits(denoiser: Denoiser, z: Tensor, gamma: Tensor, t: Tensor, e: Tensor, m: Tensor,
                         prompt: Tensor, segment_ids: Tensor | None, logits_c: Tensor, mode: str,
                         generator: Generators, gamma_target: Tensor | None = None) -> Tensor:
    """logits_u [b, s, V]: the network's view of z [b, s, d] at γ [b] (a flow map's jump to ``gamma_target`` [b])
    without the ``prompt`` positions (Bool[b, s]), hidden as ``mode`` says. Rows without a prompt position are not
    evaluated: their unconditional view is the conditional one, ``logits_c``; in ``drop`` mode the prompt
    positions hold ``logits_c`` as well."""
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"unknown guidance mode {mode!r}: choose one of {', '.join(GUIDANCE_MODES)}")
    rows = prompt.any(dim=1).nonzero().flatten()
    if not rows.numel():
        return logits_c
    z_r, gamma_r, prompt_r = z[rows], gamma[rows], prompt[rows]
    segments = None if segment_ids is None else segment_ids[rows]
    target_r = None if gamma_target is None else gamma_target[rows]
    if mode == "drop":
        real = torch.ones_like(prompt_r) if segments is None else segments == 0  # the canvas' padding: segment 1
        hidden = dropped_prompt_logits(denoiser, z_r, gamma_r, real & ~prompt_r, logits_c[rows], target_r)
    else:
        z_u = unconditional_input(z_r, e[rows], m, prompt_r, t, mode, denoiser.sigma, for_rows(generator, rows))
        hidden = evaluate(denoiser, z_u, gamma_r, segments, target_r)
    return hidden if rows.numel() == prompt.size(0) else logits_c.index_copy(0, rows, hidden)


def guidance_passes(denoiser: Denoiser, z: Tensor, gamma: Tensor, t: Tensor, e: Tensor, m: Tensor, prompt: Tensor,
                    segment_ids: Tensor | None, cfg: SampleSection, generator: Generators,
                    unconditional: bool = True, gamma_target: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(logits_c, logits_u or None) [b, s, V] at γ [b] (bridge time ``t``, a scalar tensor; a flow-map student's
    jump target ``gamma_target`` γ_t [b]): the conditional pass, and where guidance is on (``cfg.guidance_scale``
    ≠ 0) and ``unconditional`` asks for it, the unconditional one (:func:`unconditional_logits`). ``e`` [b, s, d]
    clean embeddings of the observed tokens."""
    logits_c = evaluate(denoiser, z, gamma, segment_ids, gamma_target)
    if cfg.guidance_scale == 0 or not unconditional:
        return logits_c, None
    return logits_c, unconditional_logits(denoiser, z, gamma, t, e, m, prompt, segment_ids, logits_c,
                                          cfg.guidance_mode, generator, gamma_target)


def guided_logits(logits_c: Tensor, logits_u: Tensor | None, cfg: SampleSection) -> Tensor:
    """The logits [b, s, V] tokens are drawn from: ``log p_c + s·(log p_c − log p_u)`` with the logits target,
    the conditional ``logits_c`` with the velocity target or without an unconditional pass."""
    if logits_u is None or cfg.guidance_target != "logits":
        return logits_c
    log_c, log_u = torch.log_softmax(logits_c.float(), -1), torch.log_softmax(logits_u.float(), -1)
    return log_c + cfg.guidance_scale * (log_c - log_u)


def guided_posterior_mean(logits_c: Tensor, logits_u: Tensor | None, z: Tensor, t: Tensor, table: Tensor,
                          cfg: SampleSection) -> Tensor:
    """x̂0 [b, s, d] from a step's passes (:func:`guidance_passes`) at z [b, s, d], bridge time ``t``; ``table``
    E [V, d]. Unguided without ``logits_u``."""
    if logits_u is None or cfg.guidance_target == "logits":
        return posterior_mean_embedding(guided_logits(logits_c, logits_u, cfg), table)
    v_c = velocity(posterior_mean_embedding(logits_c, table), z, t)
    v_u = velocity(posterior_mean_embedding(logits_u, table), z, t)
    return z + (1 - t) * (v_c + cfg.guidance_scale * (v_c - v_u))
