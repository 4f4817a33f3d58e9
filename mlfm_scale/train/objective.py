"""The MLFM training objective on the model: corrupt a micro-batch, run the network, reduce the loss.

    ids ─embed→ e ─(γ, p, C, bridge noise)→ z ─model(z, γ)→ logits ─vocab-parallel CE (, x̂0)→ loss

``corrupt`` and ``loss`` are separate so a pipeline can draw the corruption on its first stage and reduce
the loss on its last. Every draw comes from the one ``torch.Generator`` passed in, seeded by the caller from
(seed, step, micro-batch, data-parallel rank): tensor-parallel peers draw identical corruption.
``kind = mdm`` trains the same network as a plain masked diffusion model (z = m on C, fixed γ), the baseline.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mlfm_scale.config import ObjectiveSection, SFTSection
from mlfm_scale.data.batch import MicroBatch
from mlfm_scale.flow.bridge import bridge_forward, sample_corrupted
from mlfm_scale.flow.objective import embedding_mse, masked_loss, sft_loss
from mlfm_scale.flow.schedules import (
    GammaSchedule,
    active_curve_for,
    bridge_time,
    gamma_schedule_for,
    mask_ratio,
    stratified_uniform,
)
from mlfm_scale.model.mlfm import MLFMModel


@dataclass
class Draw:
    """The model-free draws of a micro-batch: γ and p [b], corrupted / valid Bool[b, s]."""

    gamma: torch.Tensor
    p: torch.Tensor
    corrupted: torch.Tensor
    valid: torch.Tensor


@dataclass(kw_only=True)
class Corruption(Draw):
    """A Draw plus what the forward process made of it: z and e [b, s, d], t [b]."""

    z: torch.Tensor
    e: torch.Tensor
    t: torch.Tensor


class MLFMObjective:
    """MLFM.md's forward process and velocity objective (CE through the clean-data parameterisation, plus
    λ·‖x̂0 − e‖²), with the adaptive γ curve when the schedule uses it. ``special_ids``: (EOS, others…), never
    corrupted in pretraining (SFT corrupts the response, its EOS padding included); ``sft``: the SFT stage's
    settings (used on prompt/response batches)."""

    def __init__(self, cfg: ObjectiveSection, mask_id: int, special_ids: tuple[int, ...],
                 sft: SFTSection | None = None):
        self.cfg, self.mask_id, self.sft = cfg, mask_id, sft or SFTSection()
        self.eos_id = special_ids[0]
        self.special_ids = torch.tensor(sorted(set(special_ids) | {mask_id}))
        self.curve = active_curve_for(cfg)
        self._schedule = gamma_schedule_for(cfg, self.curve)
        self._probe: float | None = None
        self.poisoned = False  # test-only fault (train.inject_nonfinite): the step's loss, hence its gradient, is NaN

    @contextmanager
    def probing(self, gamma: float) -> Iterator[None]:
        """Inside, every row is drawn at γ = ``gamma`` with all its valid positions corrupted and no crop: the
        decision diagnostic (``flow/decision.py``) run through the same engine as validation, on every layout."""
        self._probe = float(gamma)
        try:
            yield
        finally:
            self._probe = None

    @property
    def schedule(self) -> GammaSchedule:
        return self._schedule

    # ------------------------------------------------------------------------------------ γ curve
    def observe(self, gamma: torch.Tensor, ce: torch.Tensor, mask_ratio: torch.Tensor) -> None:
        """Feed per-sequence γ, corrupted-set CE and mask ratio, each [N] (gathered over ranks by the caller)."""
        if self.curve is not None:
            self.curve.observe(gamma, ce, mask_ratio)

    def update_curve(self) -> bool:
        """Move the active curve toward its fitted target; True (and the schedule rebuilt) if it moved."""
        if self.curve is None or not self.curve.update():
            return False
        self._schedule = gamma_schedule_for(self.cfg, self.curve)
        return True

    def state_dict(self) -> dict:
        return {"curve": None if self.curve is None else self.curve.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.curve is not None and state.get("curve") is not None:
            self.curve.load_state_dict(state["curve"])
            self._schedule = gamma_schedule_for(self.cfg, self.curve)

    # ---------------------------------------------------------------------------------- corruption
    def _uniforms(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.cfg.low_discrepancy:
            return stratified_uniform(n, generator)
        return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)

    def valid_positions(self, batch: MicroBatch) -> torch.Tensor:
        """Bool[b, s]: real positions (below the row's length) holding no special token."""
        positions = torch.arange(batch.tokens.size(1), device=batch.tokens.device)
        real = positions[None] < batch.lengths[:, None]
        return real & ~torch.isin(batch.tokens, self.special_ids.to(batch.tokens.device))

    def draw(self, batch: MicroBatch, generator: torch.Generator) -> Draw:
        """The discrete and per-sequence draws (p, γ, corrupted set), which need no model: a pipeline's last
        stage re-draws them from the first stage's seed. The bridge noise is drawn after them, in ``corrupt``."""
        c = self.cfg
        b = batch.tokens.size(0)
        device = batch.tokens.device
        valid = self.valid_positions(batch)
        p = mask_ratio(self._uniforms(b, generator), c.mask_ratio, c.mask_ratio_min, c.mask_ratio_max,
                       c.mask_ratio_power).float().to(device)
        if batch.response is not None:  # SFT: only the response, and some rows wholly
            valid = batch.response & (torch.arange(batch.tokens.size(1), device=device)[None] < batch.lengths[:, None])
            whole = torch.rand(b, generator=generator, device=generator.device) < self.sft.full_response_prob
            p = torch.where(whole.to(device), torch.ones_like(p), p)
        if self._probe is not None:
            gamma = torch.full((b,), self._probe, device=device)
            return Draw(gamma=gamma, p=torch.ones_like(p), corrupted=valid, valid=valid)
        corrupted = sample_corrupted(valid, p, generator)
        if c.kind == "mdm":
            gamma = torch.full((b,), c.gamma_max, device=device)
        else:
            gamma = self.schedule.sample(self._uniforms(b, generator)).float().to(device)
        return Draw(gamma=gamma, p=p, corrupted=corrupted, valid=valid)

    def corrupt(self, model: MLFMModel, batch: MicroBatch, generator: torch.Generator) -> Corruption:
        """``draw``, then the forward process on the embeddings (z = m on C for ``kind = mdm``)."""
        d = self.draw(batch, generator)
        e = model.embed(batch.tokens)
        m = model.mask_embedding(self.mask_id)
        t = bridge_time(d.gamma, self.cfg.sigma)
        if self.cfg.kind == "mdm":
            z = torch.where(d.corrupted.unsqueeze(-1), m.to(e.dtype), e)
        else:
            z = bridge_forward(e, m, t, d.corrupted, self.cfg.sigma, generator)
        return Corruption(z=z, e=e, t=t, gamma=d.gamma, p=d.p, corrupted=d.corrupted, valid=d.valid)

    # -------------------------------------------------------------------------------------- loss
    def loss(self, model, logits: torch.Tensor, batch: MicroBatch, c: Draw
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, per-sequence diagnostics [b]: ce, accuracy, confidence, entropy, gamma, mask_ratio, tokens).

        ``model`` provides ``vocab_outputs`` (the model, or a pipeline's last stage); ``c`` is the Corruption,
        or just its Draw when the x̂0 term is off (a pipeline's last stage has no clean embeddings)."""
        want_x0 = self.cfg.mse_weight > 0 and self.cfg.kind == "mlfm"
        out = model.vocab_outputs(logits, batch.tokens, posterior_mean=want_x0)
        reduce = lambda values: self.reduce(values, batch, c)
        loss = reduce(out.ce)
        if want_x0:
            loss = loss + self.cfg.mse_weight * reduce(embedding_mse(out.x0_hat, c.e.detach()))
        if self.poisoned:
            loss = loss * float("nan")
        return loss, self.diagnostics(out, out.ce, batch, c)

    @staticmethod
    def diagnostics(out, ce: torch.Tensor, batch: MicroBatch, c: Draw) -> dict[str, torch.Tensor]:
        """Per-sequence diagnostics [b]: the means over the corrupted set of ``ce`` [b, s] and of ``out``'s
        accuracy, confidence and entropy (VocabOutputs), and the draw's gamma and mask ratio, and the lengths."""
        count = c.corrupted.sum(dim=1)  # a row with nothing corrupted reports NaN (the γ curve skips it)
        per_row = lambda x: torch.where(c.corrupted, x.detach().float(), 0.0).sum(dim=1) / count
        return {"ce": per_row(ce), "accuracy": per_row(out.correct), "confidence": per_row(out.max_prob),
                "entropy": per_row(out.entropy), "gamma": c.gamma.detach(), "mask_ratio": c.p.detach(),
                "tokens": batch.lengths.detach()}

    def reduce(self, values: torch.Tensor, batch: MicroBatch, c: Draw) -> torch.Tensor:
        """Scalar reduction of per-position losses ``values`` [b, s] over the corrupted set: LLaDA-normalised over
        the response for SFT batches, ``objective.reduction`` otherwise."""
        if batch.response is not None:
            return sft_loss(values, c.corrupted, c.p, c.valid)
        return masked_loss(values, c.corrupted, c.p, c.valid, self.cfg.reduction)

    def crop(self, batch: MicroBatch, generator: torch.Generator) -> MicroBatch:
        """Pretraining keeps a random prefix of the micro-batch with probability ``crop_probability`` (the
        first draws of a micro-batch's generator; no draw when cropping is off or for SFT). SFT cuts the EOS
        padding after the longest row (its content and first EOS), rounded up to ``sft.crop_multiple``."""
        if batch.response is not None:
            s = batch.tokens.size(1)
            positions = torch.arange(s, device=batch.tokens.device)
            content = torch.where(batch.tokens != self.eos_id, positions + 2, 0).max()  # through the first EOS
            m = self.sft.crop_multiple
            return batch.prefix(min(s, -(-int(content) // m) * m))
        if self.cfg.crop_probability > 0 and self._probe is None:
            draw = torch.rand(2, generator=generator, device=generator.device)
            if draw[0] < self.cfg.crop_probability:
                return batch.prefix(1 + int(draw[1] * batch.tokens.size(1)))
        return batch

    def __call__(self, model: MLFMModel, batch: MicroBatch, generator: torch.Generator
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Crop, corrupt, forward and reduce one micro-batch."""
        batch = self.crop(batch, generator)
        c = self.corrupt(model, batch, generator)
        logits = model(c.z, c.gamma, batch.segment_ids)
        return self.loss(model, logits, batch, c)
