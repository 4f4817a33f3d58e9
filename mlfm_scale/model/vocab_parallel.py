"""Softmax statistics over a vocabulary split across tensor-parallel ranks, without gathering the logits.

Each rank holds logits [..., V/tp] for its vocabulary slice [start, start + V/tp) and the matching rows of the
embedding table [V/tp, d]. One max, and sums of exp(logit − max) (scalar per position, and d-wide for x̂0),
are reduced over the TP group; the sums through megatron's differentiable all-reduce (backward: identity),
so gradients are those of the full-vocabulary computation. With tp = 1 the reductions are no-ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


@dataclass
class VocabOutputs:
    """Per position: ce [...] (differentiable), x0_hat [..., d] (differentiable, softmax(logits)·E; None unless
    the embedding table was given),
    and detached diagnostics: max_prob, correct (argmax == target, float), entropy (nats)."""

    ce: torch.Tensor
    x0_hat: torch.Tensor | None
    max_prob: torch.Tensor
    correct: torch.Tensor
    entropy: torch.Tensor


def _tp_active() -> bool:
    return parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1


def _sum(x: torch.Tensor) -> torch.Tensor:
    return reduce_from_tensor_model_parallel_region(x) if _tp_active() else x


def _max(x: torch.Tensor) -> torch.Tensor:
    if _tp_active():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    return x


def vocab_parallel_outputs(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                           table: torch.Tensor | None = None) -> VocabOutputs:
    """logits [..., V/tp] (this rank's slice, any float dtype; computed in float32), targets [...] global ids,
    vocab_start the slice's first global id, table [V/tp, d] this rank's embedding rows (for x̂0)."""
    logits = logits.float()
    local_max = logits.max(dim=-1).values
    top = _max(local_max.detach())
    shifted = logits - top.unsqueeze(-1)
    exp = shifted.exp()
    denom = _sum(exp.sum(dim=-1))
    log_z = denom.log()
    x0_hat = None if table is None else _sum(exp @ table.float()) / denom.unsqueeze(-1)

    local = targets - vocab_start
    here = (local >= 0) & (local < logits.size(-1))
    target_logit = _sum(torch.where(here, shifted.gather(-1, local.clamp(0, logits.size(-1) - 1).unsqueeze(-1))
                                    .squeeze(-1), torch.zeros_like(log_z)))
    ce = log_z - target_logit
    with torch.no_grad():
        probs_times_logit = _sum((exp * shifted).sum(dim=-1)) / denom
        entropy = log_z - probs_times_logit
        max_prob = torch.exp(-log_z)  # the top logit is 0 after shifting
        correct = (target_logit >= 0).float()  # the target holds the global max
    return VocabOutputs(ce=ce, x0_hat=x0_hat, max_prob=max_prob, correct=correct, entropy=entropy)


def _shifted_log_z(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits − their global max [..., V/tp], log Σ exp of that over the whole vocabulary [...]), float32."""
    logits = logits.float()
    shifted = logits - _max(logits.max(dim=-1).values.detach()).unsqueeze(-1)
    return shifted, _sum(shifted.exp().sum(dim=-1)).log()


def vocab_parallel_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the whole vocabulary of this rank's logits [..., V/tp]: float32 [..., V/tp] (padded
    entries, pinned to the lowest value, stay the lowest float)."""
    shifted, log_z = _shifted_log_z(logits)
    return shifted - log_z.unsqueeze(-1)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``−Σ_v target_v · log softmax(logits)_v`` per position [...] (nats, float32), differentiable in ``logits``
    [..., V/tp]; ``target`` [..., V/tp] this rank's slice of a distribution over the whole vocabulary (no
    gradient). Written as log Z − Σ target·(logits − max): log Z must appear once, outside the reduction over
    ranks, for the TP all-reduce (identity backward) to give each rank softmax − target; inside it, each rank's
    term would weigh log Z by its own share of the target. Padded entries (zero target) add exactly 0."""
    shifted, log_z = _shifted_log_z(logits)
    return log_z - _sum((target.detach().float() * shifted).sum(dim=-1))


def mean_embedding(probs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """D = p·E [..., d] float32 for this rank's slice of a distribution ``probs`` [..., V/tp] and of the table
    ``table`` [V/tp, d], summed over the TP group."""
    return _sum(probs.float() @ table.float())
