"""Flow-map self-distillation (MLFM.md, "Flow-map distillation"): the objective a distillation run's Trainer
plugs in where pretraining's MLFMObjective goes, and the frozen teacher it reads.

Per micro-batch:

    pretraining's draws: mask ratio p, corrupted set C (the masked positions of a promotion round)
    time pairs s ≤ u ≤ t: quantiles of the teacher's γ law within the sampling range (sample/grid.py ``gamma_at``,
        as the sampler's grid), u the quantile midpoint; diagonal rows s = t; boundary rows 0.99 → γ_min
    z at s by the forward process (observed positions: e)
    target (no gradient)   diagonal: the frozen teacher's posterior at s (optionally logits-guided)
                           others:   p* = w₁·p_{s,u}(z) + w₂·p_{u,t}(X_{s,u}(z)), from the student (or its EMA)
    loss: soft CE −Σ_v p*_v log p_{s,t,v}(z) per position of C, reduced as pretraining's loss

The number of diagonal rows of a micro-batch is drawn once for all data-parallel ranks: the student's target
passes run only on off-diagonal rows, and under ZeRO-3 every rank must run the same passes (each gathers).
The teacher is a plain module outside the engine, TP-sharded and replicated over data-parallel ranks; the input
table E (frozen, identical in teacher and student) is read from it, so x̂ = p·E needs no ZeRO-3 gather.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from mlfm_scale.config import Config, ModelSection
from mlfm_scale.data.batch import MicroBatch
from mlfm_scale.errors import UserError
from mlfm_scale.flow.bridge import bridge_forward
from mlfm_scale.flow.flowmap import composition_weights, flow_map
from mlfm_scale.flow.schedules import bridge_time
from mlfm_scale.model.vocab_parallel import (
    mean_embedding,
    soft_cross_entropy,
    vocab_parallel_log_softmax,
)
from mlfm_scale.sample.grid import gamma_at
from mlfm_scale.sample.guidance import unconditional_input
from mlfm_scale.train.objective import MLFMObjective

Q_MAX = 0.99  # the sampler grid's first quantile: where a promotion round's trajectory starts
# model settings that may differ between teacher and student: how the network runs, not what it computes
RUN_ONLY = ("flow_map", "recompute", "attention")
# objective settings that define the teacher's bridge and γ law, which the student is trained along
BRIDGE = ("kind", "sigma", "gamma_min", "gamma_max", "gamma_schedule", "gamma_loc", "gamma_scale",
          "mixture_weights", "active")


def rows(segment_ids: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if segment_ids is None else segment_ids[index]


@dataclass
class TimePairs:
    """Per row [b]: start, midpoint and target quantiles q_s ≥ q_u ≥ q_t of the γ law (higher: noisier), and
    which rows are diagonal (q_s = q_t)."""

    q_s: torch.Tensor
    q_u: torch.Tensor
    q_t: torch.Tensor
    diagonal: torch.Tensor


def draw_time_pairs(b: int, diagonal: int, boundary_prob: float, generator: torch.Generator) -> TimePairs:
    """``b`` rows, ``diagonal`` of them (chosen at random) with s = t at a uniform quantile in [0, Q_MAX]; the
    others two uniform quantiles, the noisier as s, or with probability ``boundary_prob`` the whole range
    (Q_MAX → 0: γ_min)."""
    device = generator.device
    order = torch.randperm(b, generator=generator, device=device)
    is_diagonal = torch.zeros(b, dtype=torch.bool, device=device).index_fill(0, order[:diagonal], True)
    a, c = (torch.rand(b, generator=generator, device=device, dtype=torch.float64) * Q_MAX for _ in range(2))
    boundary = (torch.rand(b, generator=generator, device=device) < boundary_prob) & ~is_diagonal
    q_s = torch.where(is_diagonal, a, torch.where(boundary, Q_MAX, torch.maximum(a, c)))
    q_t = torch.where(is_diagonal, q_s, torch.where(boundary, 0.0, torch.minimum(a, c)))
    return TimePairs(q_s=q_s, q_u=(q_s + q_t) / 2, q_t=q_t, diagonal=is_diagonal)


def check_student(student: Config, teacher: dict, where: str) -> None:
    """The student must be the teacher's network on the teacher's bridge: every model setting but RUN_ONLY, and
    the objective's BRIDGE settings, equal to the teacher's config (``teacher``, as saved), or a clear error."""
    ours = student.model_dump(mode="json")
    differ = {f"{section}.{k}": (v, ours[section].get(k)) for section, keep in
              (("model", lambda k: k not in RUN_ONLY), ("objective", lambda k: k in BRIDGE))
              for k, v in teacher[section].items() if keep(k) and ours[section].get(k) != v}
    if differ:
        found = ", ".join(f"{k} {theirs} (here {here})" for k, (theirs, here) in differ.items())
        fixes = " ".join(f"{k}={json.dumps(theirs)}" for k, (theirs, _) in differ.items())
        raise UserError(f"the student must be the teacher's network on the teacher's bridge, but the teacher "
                        f"({where}) has other settings: {found}; set {fixes}")


class DistillObjective(MLFMObjective):
    """The flow-map distillation objective over ``teacher`` (a frozen MLFMModel on this rank's TP slice) and its
    checkpoint's registered components ``teacher_state``: the γ law is the teacher's and is never adapted;
    ``gamma_range`` is the sampling range (γ_min, γ_max) the student is trained for, resolved as the sampler
    resolves it from the teacher's decision profile; ``target_weights`` swaps in the weights that compute the
    composed targets (the trainer sets the student's EMA for ``distill.target=ema``)."""

    def __init__(self, cfg: Config, mask_id: int, special_ids: tuple[int, ...], teacher, teacher_state: dict):
        from mlfm_scale.flow.decision import window_of
        from mlfm_scale.sample.grid import sampling_range

        super().__init__(cfg.objective, mask_id, special_ids, cfg.sft)
        self.distill, self.grid, self.teacher = cfg.distill, cfg.sample.grid, teacher
        self.load_state_dict(teacher_state.get("objective") or {})
        self.teacher_profile = teacher_state.get("decision")  # kept by the student's run: its exports carry it
        self.gamma_range = sampling_range(cfg.sample, window_of(self.teacher_profile), self.schedule)[:2]
        self.target_weights: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    # the teacher's γ curve stays as it was trained
    def observe(self, gamma: torch.Tensor, ce: torch.Tensor, mask_ratio: torch.Tensor) -> None:
        return None

    def update_curve(self) -> bool:
        return False

    # ------------------------------------------------------------------------------------ draws
    def diagonal_rows(self, b: int, generator: torch.Generator) -> int:
        """How many of a micro-batch's ``b`` rows are diagonal: Binomial(b, diagonal_fraction), drawn by
        data-parallel rank 0 and shared, so every rank runs the same target passes."""
        from megatron.core import parallel_state as ps

        count = torch.bernoulli(torch.full((b,), self.distill.diagonal_fraction, device=generator.device),
                                generator=generator).sum().long()
        if ps.model_parallel_is_initialized() and ps.get_data_parallel_world_size() > 1:
            group = ps.get_data_parallel_group()
            dist.broadcast(count, src=dist.get_global_rank(group, 0), group=group)
        return int(count)

    def gammas(self, q: torch.Tensor) -> torch.Tensor:
        """γ float32 (q's shape) at quantiles ``q`` of the teacher's law within the sampling range."""
        low, high = self.gamma_range
        return gamma_at(self.schedule, q.flatten().cpu(), low, high, self.grid).view(q.shape).float().to(q.device)

    # ------------------------------------------------------------------------------------ targets
    def teacher_target(self, z: torch.Tensor, e: torch.Tensor, m: torch.Tensor, gamma: torch.Tensor,
                       t: torch.Tensor, hidden: torch.Tensor, segment_ids, generator: torch.Generator
                       ) -> torch.Tensor:
        """The teacher's posterior [b, s, V/tp] at z, γ [b]; logits-guided when ``distill.guidance_scale`` ≠ 0,
        the unconditional pass re-corrupting the ``hidden`` positions (Bool[b, s]) at bridge time t [b]."""
        log_c = vocab_parallel_log_softmax(self.teacher(z, gamma, segment_ids))
        scale = self.distill.guidance_scale
        if scale:
            z_u = unconditional_input(z, e, m, hidden, t, "corrupt", self.cfg.sigma, generator)
            log_u = vocab_parallel_log_softmax(self.teacher(z_u, gamma, segment_ids))
            log_c = vocab_parallel_log_softmax(log_c + scale * (log_c - log_u))
        return log_c.exp()

    def student_target(self, model, z: torch.Tensor, e: torch.Tensor, m: torch.Tensor, corrupted: torch.Tensor,
                       s: torch.Tensor, u: torch.Tensor, t: torch.Tensor, gammas: tuple, segment_ids
                       ) -> torch.Tensor:
        """p* = w₁·p_{s,u}(z) + w₂·p_{u,t}(X_{s,u}(z)) [b, s, V/tp] from ``model`` (bridge times s, u, t [b];
        ``gammas`` their γ)."""
        g_s, g_u, g_t = gammas
        with self.target_weights():
            first = vocab_parallel_log_softmax(model(z, g_s, segment_ids, gamma_target=g_u)).exp()
            half = flow_map(z, mean_embedding(first, self.teacher.embedding_table()), m, s, u)
            y = torch.where(corrupted.unsqueeze(-1), half, e)
            second = vocab_parallel_log_softmax(model(y, g_u, segment_ids, gamma_target=g_t)).exp()
        w1, w2 = composition_weights(s, u, t)
        # a pair whose times coincide after clamping to the range (t = s) jumps nowhere: its target is p_{s,s}
        w1, w2 = (torch.where(t > s, w, float(i)).float().view(-1, 1, 1) for i, w in enumerate((w1, w2)))
        return w1 * first + w2 * second

    # ------------------------------------------------------------------------------------ the step
    def __call__(self, model, batch: MicroBatch, generator: torch.Generator
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Crop and draw as pretraining, make the targets without gradient, then the student's jump s → t."""
        batch = self.crop(batch, generator)
        d = self.draw(batch, generator)
        b = batch.tokens.size(0)
        pairs = draw_time_pairs(b, self.diagonal_rows(b, generator), self.distill.boundary_prob, generator)
        g_s, g_u, g_t = self.gammas(torch.stack([pairs.q_s, pairs.q_u, pairs.q_t])).unbind()
        t_s, t_u, t_t = (bridge_time(g.double(), self.cfg.sigma) for g in (g_s, g_u, g_t))
        e = self.teacher.embed(batch.tokens)
        m = self.teacher.mask_embedding(self.mask_id)
        z = bridge_forward(e, m, t_s, d.corrupted, self.cfg.sigma, generator)
        segments = batch.segment_ids
        with torch.no_grad():
            parts = []
            if (diag := pairs.diagonal.nonzero().flatten()).numel():
                real = torch.arange(batch.tokens.size(1), device=z.device)[None] < batch.lengths[:, None]
                hidden = real & ~(d.corrupted if batch.response is None else batch.response)
                parts.append((diag, self.teacher_target(z[diag], e[diag], m, g_s[diag], t_s[diag], hidden[diag],
                                                        rows(segments, diag), generator)))
            if (off := (~pairs.diagonal).nonzero().flatten()).numel():
                parts.append((off, self.student_target(model, z[off], e[off], m, d.corrupted[off], t_s[off], t_u[off],
                                                       t_t[off], (g_s[off], g_u[off], g_t[off]), rows(segments, off))))
            target = parts[0][1].new_zeros(b, *parts[0][1].shape[1:])
            for index, part in parts:
                target.index_copy_(0, index, part)
        logits = model(z, g_s, segments, gamma_target=g_t)
        ce = soft_cross_entropy(logits, target)
        loss = self.reduce(ce, batch, d)
        if self.poisoned:
            loss = loss * float("nan")
        with torch.no_grad():
            out = model.vocab_outputs(logits.detach(), batch.tokens, posterior_mean=False)
        return loss, self.diagnostics(out, ce, batch, replace(d, gamma=g_s))


def load_teacher(cfg: Config, vocab_size: int, dtype: torch.dtype, backend: str, device: torch.device):
    """Collective: (the frozen teacher MLFMModel on this rank's TP slice, in eval mode; its checkpoint's tag
    directory; its client state) from ``distill.teacher`` (a tag, or a directory with ``latest``; any layout)."""
    from mlfm_scale.model.mlfm import MLFMModel
    from mlfm_scale.train import checkpoint
    from mlfm_scale.train.reshard import UniversalReads, load_frozen

    tag_dir = checkpoint.resolve_verified(cfg.distill.teacher, "distill.teacher")
    if tag_dir.parent.resolve() == cfg.path(cfg.checkpoint.dir).resolve():
        raise UserError(f"distill.teacher={cfg.distill.teacher} is this run's own checkpoint directory: give the "
                        "student's run another out_dir")
    src = UniversalReads(tag_dir, zero3=False, device=device)
    client = src.saved["client"]
    check_student(cfg, client["config"], str(tag_dir))
    teacher_cfg = ModelSection.model_validate({**client["config"]["model"], "flow_map": False, "recompute": False})
    teacher = MLFMModel(teacher_cfg, vocab_size, cfg.parallel.tp, dtype, backend, seed=cfg.seed).to(device)
    load_frozen(teacher, src, cfg.distill.teacher_weights)
    teacher.requires_grad_(False)
    dist.barrier()
    return teacher.eval(), tag_dir, client
