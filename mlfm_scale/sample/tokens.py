"""Discrete decisions from logits: Gumbel-max sampling with temperature and top-p, and confidence scores
(by default under the tempered, filtered distribution a token was drawn from; optionally the untempered one).

Shapes: logits [..., V] (any float dtype, computed in float32); tokens Long[...]; scores float32 [...]. Every
draw comes from the generator passed in (on the logits' device): the batch's, or per-row streams (logits
[b, s, V]; flow/bridge.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from mlfm_scale.flow.bridge import Generators, uniform

CONFIDENCES = ("prob", "max_prob", "margin", "neg_entropy")
CONFIDENCE_TEMPERATURES = ("tempered", "untempered")


def tempered_log_probs(logits: Tensor, temperature: float, top_p: float = 1.0, banned: Tensor | None = None
                       ) -> Tensor:
    """log softmax(logits / temperature) restricted to the nucleus of mass ``top_p`` (the most likely tokens
    whose cumulative probability before them is below ``top_p``; the top token always stays) and without the
    ``banned`` ids (Long[k]); excluded entries are −inf. float32 [..., V]."""
    scaled = logits.float() / temperature
    if banned is not None and banned.numel():
        scaled = scaled.index_fill(-1, banned.to(scaled.device), float("-inf"))
    log_probs = torch.log_softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_lp, order = log_probs.sort(dim=-1, descending=True)
        before = sorted_lp.exp().cumsum(dim=-1) - sorted_lp.exp()
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
        log_probs = torch.log_softmax(log_probs.masked_fill(drop, float("-inf")), dim=-1)
    return log_probs


def gumbel_max(log_probs: Tensor, generator: Generators) -> Tensor:
    """One token per position from ``log_probs`` [..., V]: ``argmax(log p + G)``, G standard Gumbel. Long[...]."""
    u = uniform(log_probs.shape, generator, log_probs.device).clamp_(1e-20, 1.0 - 1e-7)
    return (log_probs - torch.log(-torch.log(u))).argmax(dim=-1)


def confidence(log_probs: Tensor, tokens: Tensor, kind: str = "prob") -> Tensor:
    """Score of the sampled ``tokens`` under ``log_probs`` [..., V] (the distribution they were drawn from):
    ``prob`` p(token), ``max_prob`` max p, ``margin`` p₁ − p₂ (top two), ``neg_entropy`` −H(p) in nats (≤ 0)."""
    probs = log_probs.exp()
    if kind == "prob":
        return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if kind == "max_prob":
        return probs.max(dim=-1).values
    if kind == "margin":
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if kind == "neg_entropy":
        return -torch.special.entr(probs).sum(dim=-1)
    raise ValueError(f"unknown confidence {kind!r}: choose one of {', '.join(CONFIDENCES)}")


def sample_and_score(logits: Tensor, temperature: float, top_p: float, banned: Tensor | None, kind: str,
                     generator: Generators, scored_under: str = "tempered") -> tuple[Tensor, Tensor]:
    """(tokens Long[...], confidence float32 [...]): Gumbel-max draws from the tempered nucleus of ``logits``
    [..., V] without ``banned`` ids, scored by ``kind`` under ``scored_under``: ``tempered``, the distribution
    they were drawn from (the reference sampler's rule: at temperature 0.1 a clear favourite scores near 1);
    ``untempered``, the model's own softmax of the logits without the banned ids (no temperature or nucleus),
    so the temperature sharpens the draw but not the confidence a promotion threshold is compared with."""
    if scored_under not in CONFIDENCE_TEMPERATURES:
        raise ValueError(f"unknown confidence temperature {scored_under!r}: choose one of "
                         f"{', '.join(CONFIDENCE_TEMPERATURES)}")
    drawn_from = tempered_log_probs(logits, temperature, top_p, banned)
    tokens = gumbel_max(drawn_from, generator)
    scored = drawn_from if scored_under == "tempered" else tempered_log_probs(logits, 1.0, 1.0, banned)
    return tokens, confidence(scored, tokens, kind)
