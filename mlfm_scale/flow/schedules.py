"""Time and corruption schedules (MLFM.md, "Forward process" and "γ schedules").

γ is the log noise-to-signal ratio; the bridge time is ``t(γ) = sigmoid(log σ² − γ)``. A :class:`GammaSchedule`
is a distribution over γ on ``[gamma_min, gamma_max]`` given by its CDF, inverse CDF and density; drawing γ as
``icdf(u)`` from stratified ``u`` keeps the batch's low discrepancy. Parametric schedules (uniform, normal,
Gumbel) are *truncated* to the range and renormalised, so ``cdf`` and ``icdf`` are exact inverses on it; a
piecewise schedule's knots are its support. Schedules compute in float64 and return the input's floating dtype.
:class:`ActiveGammaCurve` adapts a piecewise schedule to where the training loss changes fastest.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mlfm_scale.errors import UserError
from mlfm_scale.flow.logistic import fit_generalised_logistic, generalised_logistic, generalised_logistic_inverse

if TYPE_CHECKING:
    from mlfm_scale.config import ObjectiveSection

GAMMA_SCHEDULES = ("uniform", "normal", "gumbel", "active_piecewise", "active_mixture")
MASK_RATIOS = ("maskgit_cosine", "uniform")


def bridge_time(gamma: Tensor, sigma: float) -> Tensor:
    """Bridge time ``t = sigmoid(log σ² − γ)`` in (0, 1) (0 = pure mask, 1 = clean); same shape/dtype as γ."""
    return torch.sigmoid(2.0 * math.log(sigma) - gamma)


def gamma_of_time(t: Tensor, sigma: float) -> Tensor:
    """Inverse of :func:`bridge_time`: ``γ = log σ² − logit(t)`` for t in (0, 1)."""
    return 2.0 * math.log(sigma) - torch.logit(t)


def stratified_uniform(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """Tensor[n] of ``u_b = (b + U_b)/n`` in a random order: each stratum ``[b/n, (b+1)/n)`` is hit once.

    Drawn on the generator's device; float64 by default so no value rounds onto its stratum's upper edge.
    """
    strata = torch.randperm(n, generator=generator, device=generator.device)
    jitter = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    return ((strata + jitter) / n).to(dtype)


def mask_ratio(u: Tensor, kind: str = "maskgit_cosine", p_min: float = 0.05, p_max: float = 1.0,
               power: float = 1.0) -> Tensor:
    """Per-sequence mask probability p from u in [0, 1]; same shape as u.

    ``maskgit_cosine``: ``p = p_min + (p_max − p_min)·cos(πu/2)^power`` (u = 0 → p_max, u = 1 → p_min);
    ``uniform``: ``p = p_min + (p_max − p_min)·u``.
    """
    if kind == "maskgit_cosine":
        shape = torch.cos(0.5 * math.pi * u).clamp_min(0.0) ** power
    elif kind == "uniform":
        shape = u
    else:
        raise UserError(f"unknown mask ratio {kind!r}: choose one of {', '.join(MASK_RATIOS)}")
    return p_min + (p_max - p_min) * shape


# ------------------------------------------------------------------------------------------ γ schedules
class GammaSchedule:
    """A distribution over γ on ``[gamma_min, gamma_max]``. Subclasses define ``_cdf``, ``_icdf``, ``_pdf`` on
    float64 tensors; the public methods convert and return the input's floating dtype (float64 otherwise)."""

    def __init__(self, gamma_min: float, gamma_max: float):
        if not gamma_min < gamma_max:
            raise UserError(f"gamma_min {gamma_min} must be below gamma_max {gamma_max}")
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)

    def cdf(self, gamma: Tensor) -> Tensor:
        """P(Γ ≤ γ), 0 below gamma_min and 1 above gamma_max."""
        return self._apply(self._cdf, gamma)

    def icdf(self, q: Tensor) -> Tensor:
        """The γ at probability q in [0, 1] (q is clamped to it)."""
        return self._apply(self._icdf, torch.as_tensor(q).clamp(0.0, 1.0))

    def pdf(self, gamma: Tensor) -> Tensor:
        """Density in 1/γ-units; 0 outside the support."""
        return self._apply(self._pdf, gamma)

    def sample(self, u: Tensor) -> Tensor:
        """γ = icdf(u) clamped to ``[gamma_min, gamma_max]``; pass stratified u to keep the batch stratified."""
        return self.icdf(u).clamp(self.gamma_min, self.gamma_max)

    @staticmethod
    def _apply(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        dtype = x.dtype if x.is_floating_point() else torch.float64
        return fn(x.to(torch.float64)).to(dtype)

    def _cdf(self, gamma: Tensor) -> Tensor:
        raise NotImplementedError

    def _icdf(self, q: Tensor) -> Tensor:
        raise NotImplementedError

    def _pdf(self, gamma: Tensor) -> Tensor:
        raise NotImplementedError


class _TruncatedSchedule(GammaSchedule):
    """A base distribution (CDF ``_base_cdf``, density ``_base_pdf``, quantile ``_base_icdf``) truncated to
    ``[gamma_min, gamma_max]`` and renormalised."""

    def __init__(self, gamma_min: float, gamma_max: float):
        super().__init__(gamma_min, gamma_max)
        bounds = self._base_cdf(torch.tensor([self.gamma_min, self.gamma_max], dtype=torch.float64))
        self._cdf_lo, self._mass = float(bounds[0]), float(bounds[1] - bounds[0])
        if not self._mass > 0.0:
            raise UserError(f"{type(self).__name__} puts no probability on [{gamma_min}, {gamma_max}]: "
                            "move its loc into the range or widen its scale")

    def _cdf(self, gamma: Tensor) -> Tensor:
        inside = gamma.clamp(self.gamma_min, self.gamma_max)
        return ((self._base_cdf(inside) - self._cdf_lo) / self._mass).clamp(0.0, 1.0)

    def _icdf(self, q: Tensor) -> Tensor:
        return self._base_icdf(self._cdf_lo + q * self._mass).clamp(self.gamma_min, self.gamma_max)

    def _pdf(self, gamma: Tensor) -> Tensor:
        inside = (gamma >= self.gamma_min) & (gamma <= self.gamma_max)
        return torch.where(inside, self._base_pdf(gamma) / self._mass, 0.0)

    def _base_cdf(self, gamma: Tensor) -> Tensor:
        raise NotImplementedError

    def _base_icdf(self, p: Tensor) -> Tensor:
        raise NotImplementedError

    def _base_pdf(self, gamma: Tensor) -> Tensor:
        raise NotImplementedError


class UniformGamma(_TruncatedSchedule):
    """Uniform on ``[gamma_min, gamma_max]`` (the Lebesgue measure, truncated)."""

    def _base_cdf(self, gamma: Tensor) -> Tensor:
        return gamma

    def _base_icdf(self, p: Tensor) -> Tensor:
        return p

    def _base_pdf(self, gamma: Tensor) -> Tensor:
        return torch.ones_like(gamma)


class NormalGamma(_TruncatedSchedule):
    """Normal(loc, scale) truncated to ``[gamma_min, gamma_max]``."""

    def __init__(self, loc: float, scale: float, gamma_min: float, gamma_max: float):
        if not scale > 0:
            raise UserError(f"normal γ schedule scale must be positive, got {scale}")
        self.loc, self.scale = float(loc), float(scale)
        super().__init__(gamma_min, gamma_max)

    def _base_cdf(self, gamma: Tensor) -> Tensor:
        return 0.5 * torch.erfc(-(gamma - self.loc) / (self.scale * math.sqrt(2.0)))

    def _base_icdf(self, p: Tensor) -> Tensor:
        return self.loc + self.scale * math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)

    def _base_pdf(self, gamma: Tensor) -> Tensor:
        z = (gamma - self.loc) / self.scale
        return torch.exp(-0.5 * z * z) / (self.scale * math.sqrt(2.0 * math.pi))


class GumbelGamma(_TruncatedSchedule):
    """Gumbel (maximum, right-skewed) with CDF ``exp(−exp(−(γ − loc)/scale))``, truncated to the range."""

    def __init__(self, loc: float, scale: float, gamma_min: float, gamma_max: float):
        if not scale > 0:
            raise UserError(f"gumbel γ schedule scale must be positive, got {scale}")
        self.loc, self.scale = float(loc), float(scale)
        super().__init__(gamma_min, gamma_max)

    def _base_cdf(self, gamma: Tensor) -> Tensor:
        return torch.exp(-torch.exp(-(gamma - self.loc) / self.scale))

    def _base_icdf(self, p: Tensor) -> Tensor:
        return self.loc - self.scale * torch.log(-torch.log(p))

    def _base_pdf(self, gamma: Tensor) -> Tensor:
        z = (gamma - self.loc) / self.scale
        return torch.exp(-z - torch.exp(-z)) / self.scale


class PiecewiseGamma(GammaSchedule):
    """Inverse CDF given at K equally spaced quantiles ``0, 1/(K−1), …, 1`` with linear interpolation.

    ``knots_gamma``: Tensor[K], non-decreasing; clamped into ``[gamma_min, gamma_max]``. The density is constant
    between neighbouring knots, ``1/((K−1)·Δknot)``; equal knots make a point mass (the CDF jumps there).
    """

    def __init__(self, knots_gamma: Tensor, gamma_min: float, gamma_max: float):
        super().__init__(gamma_min, gamma_max)
        knots = torch.as_tensor(knots_gamma).detach().to("cpu", torch.float64).flatten()
        if knots.numel() < 2 or bool((knots.diff() < 0).any()):
            raise UserError(f"piecewise γ schedule needs ≥ 2 non-decreasing knots, got {knots.tolist()}")
        self.knots = knots.clamp(self.gamma_min, self.gamma_max)

    def _segment(self, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For each γ: the knots on its device, how many knots are ≤ γ, its segment index and that width."""
        knots = self.knots.to(gamma.device)
        upper = torch.searchsorted(knots, gamma, right=True)  # knots[upper − 1] ≤ γ < knots[upper]
        lower = (upper - 1).clamp(0, knots.numel() - 2)
        return knots, upper, lower, (knots[lower + 1] - knots[lower]).clamp_min(1e-300)

    def _cdf(self, gamma: Tensor) -> Tensor:
        knots, upper, lower, width = self._segment(gamma)
        segments = knots.numel() - 1
        q = (lower + ((gamma - knots[lower]) / width).clamp(0.0, 1.0)) / segments
        return torch.where(upper == 0, 0.0, torch.where(upper > segments, 1.0, q))

    def _icdf(self, q: Tensor) -> Tensor:
        knots = self.knots.to(q.device)
        position = q * (knots.numel() - 1)
        lower = position.floor().long().clamp(0, knots.numel() - 2)
        return torch.lerp(knots[lower], knots[lower + 1], position - lower)

    def _pdf(self, gamma: Tensor) -> Tensor:
        knots, upper, _, width = self._segment(gamma)
        segments = knots.numel() - 1
        return torch.where((upper > 0) & (upper <= segments), 1.0 / (segments * width), 0.0)


class MixtureGamma(GammaSchedule):
    """Weighted mixture: cdf and pdf are weighted sums. ``icdf`` interpolates q in a cdf table (4097 points, built
    once) and refines by a safeguarded Newton step (bisection where Newton would leave the bracket), reaching
    float64 rounding at a few cdf evaluations, as sampling a batch's γ every step needs.
    ``weights`` are normalised to sum to 1."""

    TABLE_POINTS = 4097
    REFINE_STEPS = 1

    def __init__(self, components: Sequence[GammaSchedule], weights: Sequence[float]):
        if len(components) != len(weights) or not components:
            raise UserError(f"mixture γ schedule needs one weight per component, got {len(components)} components "
                            f"and weights {list(weights)}")
        if any(w < 0 for w in weights) or not sum(weights) > 0:
            raise UserError(f"mixture weights must be non-negative with a positive sum, got {list(weights)}")
        super().__init__(min(c.gamma_min for c in components), max(c.gamma_max for c in components))
        self.components = list(components)
        self.weights = [float(w) / sum(weights) for w in weights]
        self._grid = torch.linspace(self.gamma_min, self.gamma_max, self.TABLE_POINTS, dtype=torch.float64)
        self._grid_cdf = torch.cummax(self._cdf(self._grid), dim=0).values

    def _cdf(self, gamma: Tensor) -> Tensor:
        return sum(w * c.cdf(gamma) for c, w in zip(self.components, self.weights, strict=True))

    def _pdf(self, gamma: Tensor) -> Tensor:
        return sum(w * c.pdf(gamma) for c, w in zip(self.components, self.weights, strict=True))

    def _icdf(self, q: Tensor) -> Tensor:
        grid, grid_cdf = self._grid.to(q.device), self._grid_cdf.to(q.device)
        upper = torch.searchsorted(grid_cdf, q).clamp(1, self.TABLE_POINTS - 1)
        lo, hi = grid[upper - 1], grid[upper]
        c_lo, c_hi = grid_cdf[upper - 1], grid_cdf[upper]
        g = lo + ((q - c_lo) / (c_hi - c_lo)).nan_to_num(0.0).clamp(0.0, 1.0) * (hi - lo)
        for _ in range(self.REFINE_STEPS):
            excess = self._cdf(g) - q
            lo, hi = torch.where(excess < 0, g, lo), torch.where(excess < 0, hi, g)
            newton = g - excess / self._pdf(g)
            inside = torch.isfinite(newton) & (newton >= lo) & (newton <= hi)
            g = torch.where(inside, newton, 0.5 * (lo + hi))
        return g


# ------------------------------------------------------------------------------------- active γ curve
class ActiveGammaCurve:
    """The adaptive γ distribution: draw γ where the training cross-entropy changes fastest.

    State: a bias-corrected EMA of cross-entropy per γ-bin (``bins`` equal bins on ``[gamma_min, gamma_max]``;
    one EMA step per :meth:`observe` call for each bin it hits, so the horizon is ~1/(1 − ce_decay) calls),
    the number of calls that hit each bin (bins never hit are ignored), and ``knots``: Tensor[quantiles], the
    stored inverse CDF (initially uniform). The normalised CE curve ``(CE − min)/(max − min)`` is used as a
    CDF over γ through a generalised-logistic fit, whose density is the CE slope. All state is float64 / int64
    on the CPU; :meth:`observe` moves its inputs there.
    """

    def __init__(self, gamma_min: float, gamma_max: float, bins: int = 128, quantiles: int = 101,
                 ce_decay: float = 0.999, rate: float = 0.002, r2_min: float = 0.95):
        if not gamma_min < gamma_max:
            raise UserError(f"gamma_min {gamma_min} must be below gamma_max {gamma_max}")
        if bins < 4 or quantiles < 2:
            raise UserError(f"active γ curve needs ≥ 4 bins and ≥ 2 quantiles, got {bins} and {quantiles}")
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.bins, self.quantiles = bins, quantiles
        self.ce_decay, self.rate, self.r2_min = ce_decay, rate, r2_min
        self.ce_ema = torch.zeros(bins, dtype=torch.float64)  # raw EMA from 0; divide by 1 − decay^count
        self.counts = torch.zeros(bins, dtype=torch.int64)
        self.knots = torch.linspace(self.gamma_min, self.gamma_max, quantiles, dtype=torch.float64)

    def bin_centers(self) -> Tensor:
        """Tensor[bins] float64: the γ at the middle of each bin."""
        width = (self.gamma_max - self.gamma_min) / self.bins
        return self.gamma_min + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

    def observe(self, gamma: Tensor, ce: Tensor) -> None:
        """Fold per-sequence losses into the curve. ``gamma``, ``ce``: Tensor[N] (γ, mean CE in nats).

        Each bin hit by this call takes one EMA step toward the mean CE of its samples in this call; γ outside
        the range counts in the edge bins.
        """
        gamma = gamma.detach().to("cpu", torch.float64).flatten()
        ce = ce.detach().to("cpu", torch.float64).flatten()
        position = (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min) * self.bins
        index = position.floor().long().clamp(0, self.bins - 1)
        hits = torch.bincount(index, minlength=self.bins)
        sums = torch.bincount(index, weights=ce, minlength=self.bins)
        hit = hits > 0
        means = sums[hit] / hits[hit]
        self.ce_ema[hit] = self.ce_decay * self.ce_ema[hit] + (1.0 - self.ce_decay) * means
        self.counts[hit] += 1

    def ce_curve(self) -> tuple[Tensor, Tensor]:
        """(γ centers, bias-corrected EMA CE) of the bins observed so far, both Tensor[n_observed] float64."""
        seen = self.counts > 0
        correction = 1.0 - self.ce_decay ** self.counts[seen].to(torch.float64)
        return self.bin_centers()[seen], self.ce_ema[seen] / correction

    def target_knots(self) -> Tensor | None:
        """Tensor[quantiles] float64: the inverse CDF implied by the current CE curve, or None.

        Normalises the observed curve to [0, 1], fits ``F(γ) = sigmoid((γ − loc)/s)^k``, and if R² ≥ r2_min uses
        ``(F(γ) − F(γ_min))/(F(γ_max) − F(γ_min))`` as the CDF; None when the fit is rejected or F is flat.
        """
        gamma, ce = self.ce_curve()
        if gamma.numel() < 4 or float(ce.max() - ce.min()) <= 0.0:
            return None
        fit = fit_generalised_logistic(gamma, (ce - ce.min()) / (ce.max() - ce.min()))
        if fit is None or fit.r2 < self.r2_min:
            return None
        ends = generalised_logistic(torch.tensor([self.gamma_min, self.gamma_max], dtype=torch.float64),
                                    fit.loc, fit.scale, fit.power)
        if not float(ends[1] - ends[0]) > 1e-9:
            return None
        q = torch.linspace(0.0, 1.0, self.quantiles, dtype=torch.float64)
        knots = generalised_logistic_inverse(ends[0] + q * (ends[1] - ends[0]), fit.loc, fit.scale, fit.power)
        knots = knots.clamp(self.gamma_min, self.gamma_max)
        knots[0], knots[-1] = self.gamma_min, self.gamma_max
        return torch.cummax(knots, dim=0).values

    def update(self) -> bool:
        """Move ``knots ← knots + rate·(target − knots)`` (kept sorted); False, unchanged, when no target."""
        target = self.target_knots()
        if target is None:
            return False
        self.knots = torch.cummax(self.knots + self.rate * (target - self.knots), dim=0).values
        return True

    def schedule(self) -> PiecewiseGamma:
        """A snapshot of the current knots as a schedule; rebuild it after :meth:`update` returns True."""
        return PiecewiseGamma(self.knots, self.gamma_min, self.gamma_max)

    def state_dict(self) -> dict:
        """Checkpoint state: the three tensors (copies) and the γ range they refer to."""
        return {"ce_ema": self.ce_ema.clone(), "counts": self.counts.clone(), "knots": self.knots.clone(),
                "gamma_min": self.gamma_min, "gamma_max": self.gamma_max}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; the γ range, bins and quantiles must match this curve's."""
        found = (state["gamma_min"], state["gamma_max"], state["ce_ema"].numel(), state["knots"].numel())
        expected = (self.gamma_min, self.gamma_max, self.bins, self.quantiles)
        if found != expected:
            raise UserError(f"active γ curve state has (gamma_min, gamma_max, bins, quantiles) = {found}, this run "
                            f"expects {expected}: resume with the objective settings the checkpoint was saved with")
        self.ce_ema = state["ce_ema"].to("cpu", torch.float64).clone()
        self.counts = state["counts"].to("cpu", torch.int64).clone()
        self.knots = state["knots"].to("cpu", torch.float64).clone()


def make_gamma_schedule(name: str, gamma_min: float, gamma_max: float, active: ActiveGammaCurve | None = None,
                        normal_loc: float = -2.5, normal_scale: float = 2.0,
                        mixture_weights: Sequence[float] = (0.1, 0.2, 0.7), gumbel_loc: float = -2.5,
                        gumbel_scale: float = 2.0) -> GammaSchedule:
    """Build a schedule by name (one of ``GAMMA_SCHEDULES``). The active ones snapshot ``active``'s knots:
    ``active_piecewise`` is its curve, ``active_mixture`` mixes [uniform, normal, active] by ``mixture_weights``.
    """
    if name == "uniform":
        return UniformGamma(gamma_min, gamma_max)
    if name == "normal":
        return NormalGamma(normal_loc, normal_scale, gamma_min, gamma_max)
    if name == "gumbel":
        return GumbelGamma(gumbel_loc, gumbel_scale, gamma_min, gamma_max)
    if name not in GAMMA_SCHEDULES:
        raise UserError(f"unknown γ schedule {name!r}: choose one of {', '.join(GAMMA_SCHEDULES)}")
    if active is None:
        raise UserError(f"γ schedule {name!r} needs an ActiveGammaCurve (pass active=...)")
    if (active.gamma_min, active.gamma_max) != (float(gamma_min), float(gamma_max)):
        raise UserError(f"active γ curve covers [{active.gamma_min}, {active.gamma_max}], the schedule "
                        f"[{gamma_min}, {gamma_max}]: build both from the same objective settings")
    if name == "active_piecewise":
        return active.schedule()
    components = [UniformGamma(gamma_min, gamma_max), NormalGamma(normal_loc, normal_scale, gamma_min, gamma_max),
                  active.schedule()]
    return MixtureGamma(components, mixture_weights)


def active_curve_for(cfg: ObjectiveSection) -> ActiveGammaCurve | None:
    """A fresh adaptive curve for the objective settings ``cfg``, or None when its γ schedule does not use one."""
    if not cfg.gamma_schedule.startswith("active"):
        return None
    a = cfg.active
    return ActiveGammaCurve(cfg.gamma_min, cfg.gamma_max, a.bins, a.quantiles, a.ce_decay, a.rate, a.r2_min)


def gamma_schedule_for(cfg: ObjectiveSection, curve: ActiveGammaCurve | None) -> GammaSchedule:
    """The training γ distribution of the objective settings ``cfg`` (``curve``: its adaptive curve, if any)."""
    return make_gamma_schedule(cfg.gamma_schedule, cfg.gamma_min, cfg.gamma_max, active=curve,
                               normal_loc=cfg.gamma_loc, normal_scale=cfg.gamma_scale,
                               mixture_weights=cfg.mixture_weights, gumbel_loc=cfg.gamma_loc,
                               gumbel_scale=cfg.gamma_scale)
