"""Few-step generation with a distilled flow-map student (MLFM.md, "Flow-map distillation"; ``mlfm distill``).

Each promotion round carries the remaining positions along the bridge's probability-flow ODE in K =
``cfg.steps`` jumps over the sampling grid (γ_0 > … > γ_K, t_k = t(γ_k)) instead of an SDE trajectory's small
steps, then promotes confident tokens as the MLFM sampler does:

    z_0 = forward process at t_0 (remaining positions hold the mask id, so their clean guess is m)
    logits_k = f(z_k, γ_k → γ_{k+1});  D_k = softmax(logits_k)·E
    z_{k+1} = X_{t_k, t_{k+1}}(z_k; D_k) on remaining positions, e elsewhere        — K (2K with guidance)
    tokens, confidence drawn from the last jump's logits (no extra forward)           evaluations per round

Guidance combines log-probabilities only (the logits target): D must be an average of embeddings under a
distribution, which the velocity target's x̂0 is not. ``cfg.promotion=False`` (threshold −∞) decodes every
token after one round: a one-shot K-step decoder.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mlfm_scale.config import SampleSection
from mlfm_scale.errors import UserError
from mlfm_scale.flow.bridge import Generators, bridge_forward
from mlfm_scale.flow.flowmap import flow_map
from mlfm_scale.flow.objective import posterior_mean_embedding
from mlfm_scale.flow.schedules import bridge_time
from mlfm_scale.sample.canvas import Canvas
from mlfm_scale.sample.denoiser import Denoiser
from mlfm_scale.sample.guidance import guidance_passes, guided_logits
from mlfm_scale.sample.promotion import promotion_sample
from mlfm_scale.sample.state import SampleState


def check_flowmap_request(denoiser: Denoiser, cfg: SampleSection) -> None:
    """Raise a UserError unless ``denoiser`` is a flow-map student and guidance (if any) targets the logits."""
    if not getattr(denoiser, "flow_map", False):  # denoisers that are not students need not have the attribute
        raise UserError("method=flowmap needs a flow-map model (model.flow_map) and this one is not: distil one "
                        "from it with `mlfm distill`, or sample it with method=mlfm")
    if cfg.guidance_scale != 0 and cfg.guidance_target != "logits":
        raise UserError("method=flowmap cannot guide the velocity: velocity-target CFG gives an x̂ that is not a "
                        "distribution over the vocabulary, which the flow map's D = p·E must be; set "
                        "guidance_target=logits (or guidance_scale=0)")


def flowmap_nfe(cfg: SampleSection, prompted: Tensor) -> Tensor:
    """Long[b]: network evaluations of one round per row: K jumps, and with guidance (``cfg.guidance_scale`` ≠ 0)
    an unconditional pass per jump on rows with a prompt (``prompted`` Bool[b])."""
    guided = 0 if cfg.guidance_scale == 0 else cfg.steps
    return cfg.steps + guided * prompted.long()


def flowmap_trajectory(denoiser: Denoiser, ids: Tensor, remaining: Tensor, prompt: Tensor,
                       segment_ids: Tensor | None, gamma: Tensor, cfg: SampleSection, generator: Generators,
                       keep_jump: int | None = None) -> tuple[Tensor, Tensor | None]:
    """(last jump's logits [b, s, V], logits of jump ``keep_jump`` or None) of K jumps over the ``gamma`` grid
    (Tensor[K + 1], high to low noise); logits guided with the logits target. The state after the last jump is
    not needed: the tokens are drawn from that jump's distribution.

    ``ids`` Long[b, s]: observed tokens, the mask id on ``remaining`` (Bool[b, s]) positions; ``prompt``
    Bool[b, s] the positions guidance hides in its unconditional pass."""
    e = denoiser.embed(ids)
    m = denoiser.mask_embedding()
    table = denoiser.embedding_table()
    b = ids.size(0)
    t = bridge_time(gamma, denoiser.sigma).to(e.device)
    levels = gamma.to(device=e.device, dtype=torch.float32)
    hold = remaining.unsqueeze(-1)
    z = bridge_forward(e, m, t[0], remaining, denoiser.sigma, generator)
    kept = None
    for k in range(steps := gamma.numel() - 1):
        logits_c, logits_u = guidance_passes(denoiser, z, levels[k].expand(b), t[k], e, m, prompt, segment_ids, cfg,
                                             generator, gamma_target=levels[k + 1].expand(b))
        logits = guided_logits(logits_c, logits_u, cfg)
        if k == keep_jump:
            kept = logits
        if k < steps - 1:
            z = torch.where(hold, flow_map(z, posterior_mean_embedding(logits, table), m, t[k], t[k + 1]), e)
    return logits, kept


def flowmap_sample(denoiser: Denoiser, canvas: Canvas, state: SampleState, cfg: SampleSection, threshold: float,
                   banned: Tensor, generator: Generators) -> None:
    """Fill ``state`` by rounds of K jumps + promotion (``threshold`` −∞: one round decodes every token): the
    promotion sampler with :func:`flowmap_trajectory` for its rounds. ``confidence_source=quantile`` scores by
    the draw at jump ``floor(confidence_quantile · K)``."""
    check_flowmap_request(denoiser, cfg)
    promotion_sample(denoiser, canvas, state, cfg, threshold, banned, generator, flowmap_trajectory, flowmap_nfe)
