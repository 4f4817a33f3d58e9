"""The masked stochastic bridge (MLFM.md, "Forward process", "Sampler", "Flow-map distillation").

Corrupted positions travel from the mask embedding m (t = 0) to their clean embedding e (t = 1) with marginal
``N((1−t)·m + t·e, σ²·t(1−t)·I)``; observed positions stay exactly e. Times t are scalars or Tensor[B] (one per
sequence); coefficients are computed in float32 or wider, and the state z is float32 (or wider) whatever the
network's compute dtype: the network casts it on entry. Each random draw uses the ``generator`` passed in,
which must live on the tensors' device: one ``torch.Generator`` for the batch, or :class:`RowGenerators`, one
stream per row, so that a row's numbers do not depend on the other rows (the sampler's per-prompt seeds).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class RowGenerators:
    """One ``torch.Generator`` per row of a batch. Row i of a draw [b, s, …] comes from generator i alone and
    covers only the row's first ``widths[i]`` positions (its own; s ≥ every width, the rest is 0), so neither
    the other rows nor the padded width s change a row's numbers or how far its stream advances."""

    def __init__(self, generators: Sequence[torch.Generator], widths: Sequence[int]):
        if len(generators) != len(widths):
            raise ValueError(f"{len(generators)} generators for {len(widths)} row widths")
        self.generators, self.widths = list(generators), list(widths)

    @classmethod
    def seeded(cls, seeds: Sequence[int], widths: Sequence[int], device: torch.device | str) -> RowGenerators:
        """Row i's generator on ``device`` seeded with ``seeds[i]``."""
        return cls([torch.Generator(device=device).manual_seed(seed) for seed in seeds], widths)

    def rows(self, index: Tensor) -> RowGenerators:
        """The streams of rows ``index`` (Long[a]): the same generator objects, so drawing advances them."""
        picked = index.tolist()
        return RowGenerators([self.generators[i] for i in picked], [self.widths[i] for i in picked])

    def draw(self, sample: Callable[..., Tensor], shape: Sequence[int], device: torch.device | str,
             dtype: torch.dtype) -> Tensor:
        """``sample`` (torch.randn, torch.rand) of ``shape`` [b, s, …], row by row from its own generator."""
        if shape[0] != len(self.generators):
            raise ValueError(f"a draw of {shape[0]} rows from {len(self.generators)} row generators")
        out = torch.zeros(shape, device=device, dtype=dtype)
        for i, (generator, width) in enumerate(zip(self.generators, self.widths)):
            out[i, :width] = sample((width, *shape[2:]), generator=generator, device=device, dtype=dtype)
        return out


Generators = torch.Generator | RowGenerators


def for_rows(generator: Generators, index: Tensor) -> Generators:
    """What draws for the sub-batch of rows ``index`` (Long[a]): their own streams, or the batch's generator."""
    return generator.rows(index) if isinstance(generator, RowGenerators) else generator


def _draw(sample: Callable[..., Tensor], shape: Sequence[int], generator: Generators, device: torch.device | str,
          dtype: torch.dtype) -> Tensor:
    if isinstance(generator, RowGenerators):
        return generator.draw(sample, shape, device, dtype)
    return sample(shape, generator=generator, device=device, dtype=dtype)


def normal(shape: Sequence[int], generator: Generators, device: torch.device | str,
           dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal draws of ``shape`` on ``device`` (per row with :class:`RowGenerators`)."""
    return _draw(torch.randn, shape, generator, device, dtype)


def uniform(shape: Sequence[int], generator: Generators, device: torch.device | str,
            dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform [0, 1) draws of ``shape`` on ``device`` (per row with :class:`RowGenerators`)."""
    return _draw(torch.rand, shape, generator, device, dtype)


def broadcast_time(t: Tensor | float, like: Tensor) -> Tensor:
    """t (scalar or Tensor[B]) shaped [B, 1, …, 1] to broadcast against ``like`` [B, …], on its device, in
    t's floating dtype promoted to at least float32."""
    t = torch.as_tensor(t, device=like.device)
    t = t.to(torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32)
    return t if t.ndim == 0 else t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def sample_corrupted(valid: Tensor, p: Tensor, generator: Generators) -> Tensor:
    """Corrupted set C: Bool[B, L], each valid position independently with probability ``p[b]``.

    ``valid``: Bool[B, L]; ``p``: Tensor[B] in [0, 1]. A row with valid positions but none chosen gets the valid
    position with the smallest uniform draw, which given that none was chosen is uniform among its valid ones.
    Invalid positions are never chosen. One uniform per position is drawn whatever the masks.
    """
    u = uniform(valid.shape, generator, valid.device)
    chosen = (u < p.to(u.dtype).unsqueeze(1)) & valid
    empty = valid.any(dim=1) & ~chosen.any(dim=1)
    first = torch.where(valid, u, 2.0).argmin(dim=1)
    forced = torch.zeros_like(chosen).scatter_(1, first.unsqueeze(1), True) & empty.unsqueeze(1)
    return chosen | forced


def bridge_forward(e: Tensor, m: Tensor, t: Tensor, corrupted: Tensor, sigma: float,
                   generator: Generators) -> Tensor:
    """Forward process z: Tensor[B, L, d] in float32 (or e's dtype when wider), whatever the compute dtype.

    ``e``: clean embeddings [B, L, d]; ``m``: mask embedding [d]; ``t``: Tensor[B] (or scalar) bridge time;
    ``corrupted``: Bool[B, L]. On corrupted positions ``z = (1−t)·m + t·e + σ·sqrt(t(1−t))·ε``, elsewhere z = e
    exactly. ε ~ N(0, I) is drawn for every position (e's device, float32) and then selected, so a position's
    noise does not depend on which other positions are corrupted. z is kept in float32 because the token signal
    t·(e − m) is small beside m at low t: in bf16 it would be rounded away before the network sees it.
    """
    wide = torch.promote_types(e.dtype, torch.float32)
    e = e.to(wide)
    eps = normal(e.shape, generator, e.device, wide)
    t = broadcast_time(t, e)
    noisy = (1 - t) * m.to(wide) + t * e + sigma * torch.sqrt(t * (1 - t)) * eps
    return torch.where(corrupted.unsqueeze(-1), noisy.to(wide), e)


def sde_step(z: Tensor, x0_hat: Tensor, t: Tensor | float, t_next: Tensor | float, sigma: float,
             generator: Generators) -> Tensor:
    """One bridge SDE step from t to t_next > t (t < 1): Tensor like z [B, …], in float32 or wider.

    ``z' = z + (t_next−t)/(1−t)·(x̂0 − z) + σ·sqrt((t_next−t)(1−t_next)/(1−t))·ε``. With a fixed x̂0 = e this maps
    the bridge marginal at t onto the one at t_next; at t_next = 1 the noise vanishes and z' = x̂0. ε is always
    drawn (z's shape and device, float32 or wider) so the generator advances the same way on every step; the
    state stays in float32 so that many small steps are not rounded away.
    """
    wide = torch.promote_types(z.dtype, torch.float32)
    z = z.to(wide)
    eps = normal(z.shape, generator, z.device, wide)
    t, t_next = broadcast_time(t, z), broadcast_time(t_next, z)
    dt = t_next - t
    std = sigma * torch.sqrt((dt * (1 - t_next) / (1 - t)).clamp_min(0.0))
    return (z + dt / (1 - t) * (x0_hat.to(wide) - z) + std * eps).to(wide)


def flow_drift(z: Tensor, x1_hat: Tensor, m: Tensor, t: Tensor | float) -> Tensor:
    """Probability-flow ODE drift dz/dt: Tensor like z [B, …], for t in (0, 1).

    ``b(t, z) = x̂1 − m + (1−2t)/(2t(1−t))·(z − (1−t)·m − t·x̂1)``, with x̂1 the posterior-mean clean embedding;
    it transports the bridge marginal (mean and variance) along t when x̂1 is the true e.
    """
    t = broadcast_time(t, z)
    mean = (1 - t) * m + t * x1_hat
    return (x1_hat - m + (1 - 2 * t) / (2 * t * (1 - t)) * (z - mean)).to(z.dtype)
