"""Time and corruption schedules (MLFM.md, "Forward process" and "γ schedules").

γ is the log noise-to-signal ratio; the bridge time is ``t(γ) = sigmoid(log σ² − γ)``. A :class:`GammaSchedule` is
a distribution over γ on ``[gamma_min, gamma_max]`` given by its CDF, inverse CDF and density; drawing γ as
``icdf(u)`` from stratified ``u`` keeps the batch's low discrepancy. Parametric schedules (uniform, normal,
Gumbel) are drawn from the untruncated law and *clamped* to the range, so the mass beyond each end becomes a point
mass at it (MLFM.md and the reference); a piecewise schedule's knots are its support. Schedules compute in float64
and return the input's floating dtype. :class:`ActiveGammaCurve` adapts a piecewise schedule to where the training
loss changes fastest.
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


class _ClampedSchedule(GammaSchedule):
    """A base law on the real line (CDF ``_base_cdf``, density ``_base_pdf``, quantile ``_base_icdf``) drawn
    untruncated and clamped to ``[gamma_min, gamma_max]`` (MLFM.md, γ schedules): the mass the base law puts
    below ``gamma_min`` / above ``gamma_max`` becomes a point mass *at* that end. ``pdf`` is the continuous part
    (the point masses are ``atoms()``); ``cdf`` includes them, so it jumps at the ends."""

    def atoms(self) -> tuple[float, float]:
        """The point masses (probabilities) at ``gamma_min`` and ``gamma_max``."""
        ends = self._base_cdf(torch.tensor([self.gamma_min, self.gamma_max], dtype=torch.float64))
        return float(ends[0]), float(1.0 - ends[1])

    def _cdf(self, gamma: Tensor) -> Tensor:
        inside = self._base_cdf(gamma.clamp(self.gamma_min, self.gamma_max))
        return torch.where(gamma < self.gamma_min, 0.0, torch.where(gamma >= self.gamma_max, 1.0, inside))

    def _icdf(self, q: Tensor) -> Tensor:
        return self._base_icdf(q).clamp(self.gamma_min, self.gamma_max)

    def _pdf(self, gamma: Tensor) -> Tensor:
        inside = (gamma >= self.gamma_min) & (gamma <= self.gamma_max)
        return torch.where(inside, self._base_pdf(gamma), 0.0)

    def _base_cdf(self, gamma: Tensor) -> Tensor:
        raise NotImplementedError

    def _base_icdf(self, p: Tensor) -> Tensor:
        raise NotImplementedError

    def _base_pdf(self, gamma: Tensor) -> Tensor:
        raise NotImplementedError


class UniformGamma(_ClampedSchedule):
    """Uniform on ``[gamma_min, gamma_max]`` (no mass outside, so no point masses)."""

    def _base_cdf(self, gamma: Tensor) -> Tensor:
        return ((gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)).clamp(0.0, 1.0)

    def _base_icdf(self, p: Tensor) -> Tensor:
        return self.gamma_min + p * (self.gamma_max - self.gamma_min)

    def _base_pdf(self, gamma: Tensor) -> Tensor:
        return torch.full_like(gamma, 1.0 / (self.gamma_max - self.gamma_min))


class NormalGamma(_ClampedSchedule):
    """Normal(loc, scale) clamped to ``[gamma_min, gamma_max]``."""

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


class GumbelGamma(_ClampedSchedule):
    """Gumbel (maximum, right-skewed) with CDF ``exp(−exp(−(γ − loc)/scale))``, clamped to the range."""

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
CURVE_ESTIMATORS = ("logistic", "isotonic")


class ActiveGammaCurve:
    """The adaptive γ distribution: draw γ where the training cross-entropy changes fastest.

    Statistics, per γ-bin (``bins`` equal bins on ``[gamma_min, gamma_max]``): an exponentially decayed example
    count and CE sum. Each :meth:`observe` call decays both by ``ce_decay`` and adds its rows, so counts are
    fractional and old evidence fades over ~1/(1 − ce_decay) calls. With ``mask_ratio_min`` > 0 only rows whose
    mask ratio reaches it count (the reference's SFT stage uses 0.95).

    A fit needs evidence: ``min_bins`` bins holding ≥ ``min_bin_count`` examples each, and ≥ ``min_examples``
    in them. The mean CE of those bins, normalised ``(CE − min)/(max − min)``, is read as a CDF over γ by the
    ``estimator``: ``logistic`` fits ``sigmoid((γ − loc)/s)^k`` by count-weighted least squares and accepts it at
    R² ≥ ``r2_min``; ``isotonic`` takes the count-weighted monotone (pool-adjacent-violators) regression,
    linear between bin centres. Its density is the CE slope, so γ is drawn where the loss changes fastest.

    ``knots``: Tensor[quantiles] float64, the stored inverse CDF at equally spaced quantiles, or None before the
    first accepted fit (the schedules then use the normal component in its place). The first accepted fit is
    taken in full; later ones blend in at ``rate``. All state is float64 / int on the CPU.
    """

    def __init__(self, gamma_min: float, gamma_max: float, bins: int = 128, quantiles: int = 101,
                 ce_decay: float = 0.999, rate: float = 0.002, r2_min: float = 0.95, estimator: str = "logistic",
                 min_bins: int = 8, min_examples: float = 4096, min_bin_count: float = 20, mask_ratio_min: float = 0.0):
        if not gamma_min < gamma_max:
            raise UserError(f"gamma_min {gamma_min} must be below gamma_max {gamma_max}")
        if bins < 4 or quantiles < 2:
            raise UserError(f"active γ curve needs ≥ 4 bins and ≥ 2 quantiles, got {bins} and {quantiles}")
        if estimator not in CURVE_ESTIMATORS:
            raise UserError(f"unknown γ-curve estimator {estimator!r}: choose one of {', '.join(CURVE_ESTIMATORS)}")
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.bins, self.quantiles = bins, quantiles
        self.ce_decay, self.rate, self.r2_min, self.estimator = ce_decay, rate, r2_min, estimator
        self.min_bins, self.min_examples, self.min_bin_count = max(min_bins, 4), min_examples, min_bin_count
        self.mask_ratio_min = mask_ratio_min
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.ce_sums = torch.zeros(bins, dtype=torch.float64)
        self.knots: Tensor | None = None
        self.updates = 0  # accepted fits so far

    def bin_centers(self) -> Tensor:
        """Tensor[bins] float64: the γ at the middle of each bin."""
        width = (self.gamma_max - self.gamma_min) / self.bins
        return self.gamma_min + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

    def observe(self, gamma: Tensor, ce: Tensor, mask_ratio: Tensor | None = None) -> None:
        """Fold per-sequence losses into the curve. ``gamma``, ``ce``, ``mask_ratio``: Tensor[N] (γ, mean CE over
        the row's corrupted positions in nats, the row's mask ratio p). Rows with a non-finite CE, or (with
        ``mask_ratio_min``) a lower mask ratio, are left out; γ outside the range counts in the edge bins."""
        gamma = gamma.detach().to("cpu", torch.float64).flatten()
        ce = ce.detach().to("cpu", torch.float64).flatten()
        keep = torch.isfinite(ce)
        if self.mask_ratio_min > 0 and mask_ratio is not None:
            keep &= mask_ratio.detach().to("cpu", torch.float64).flatten() >= self.mask_ratio_min
        position = (gamma[keep] - self.gamma_min) / (self.gamma_max - self.gamma_min) * self.bins
        index = position.floor().long().clamp(0, self.bins - 1)
        self.counts = self.ce_decay * self.counts + torch.bincount(index, minlength=self.bins).to(torch.float64)
        self.ce_sums = self.ce_decay * self.ce_sums + torch.bincount(index, weights=ce[keep], minlength=self.bins)

    def ce_curve(self) -> tuple[Tensor, Tensor]:
        """(γ centres, mean CE) of the bins observed so far, both Tensor[n_observed] float64."""
        seen = self.counts > 0
        return self.bin_centers()[seen], self.ce_sums[seen] / self.counts[seen]

    def evidence(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(γ centres, mean CE, counts) of the bins with ≥ ``min_bin_count`` examples, each Tensor[n] float64, or
        None while there are fewer than ``min_bins`` such bins or ``min_examples`` examples in them."""
        full = self.counts >= self.min_bin_count
        if int(full.sum()) < self.min_bins or float(self.counts[full].sum()) < self.min_examples:
            return None
        return self.bin_centers()[full], self.ce_sums[full] / self.counts[full], self.counts[full]

    def target_knots(self) -> Tensor | None:
        """Tensor[quantiles] float64: the inverse CDF the current evidence implies (non-decreasing, from
        ``gamma_min`` to ``gamma_max``), or None (too little evidence, a flat curve, or a rejected fit)."""
        found = self.evidence()
        if found is None:
            return None
        gamma, ce, counts = found
        if not float(ce.max() - ce.min()) > 0.0:
            return None
        level = (ce - ce.min()) / (ce.max() - ce.min())
        q = torch.linspace(0.0, 1.0, self.quantiles, dtype=torch.float64)
        if self.estimator == "isotonic":
            knots = isotonic_quantiles(gamma, level, counts, q, self.gamma_min, self.gamma_max)
        else:
            fit = fit_generalised_logistic(gamma, level, weights=counts)
            if fit is None or fit.r2 < self.r2_min:
                return None
            ends = generalised_logistic(torch.tensor([self.gamma_min, self.gamma_max], dtype=torch.float64),
                                        fit.loc, fit.scale, fit.power)
            if not float(ends[1] - ends[0]) > 1e-9:
                return None
            knots = generalised_logistic_inverse(ends[0] + q * (ends[1] - ends[0]), fit.loc, fit.scale, fit.power)
        knots = knots.clamp(self.gamma_min, self.gamma_max)
        knots[0], knots[-1] = self.gamma_min, self.gamma_max
        return torch.cummax(knots, dim=0).values

    def update(self) -> bool:
        """Take the target in full (the first accepted fit) or move ``knots ← knots + rate·(target − knots)``
        (kept sorted); False, unchanged, when there is no target."""
        target = self.target_knots()
        if target is None:
            return False
        if self.knots is None:
            self.knots = target
        else:
            self.knots = torch.cummax(self.knots + self.rate * (target - self.knots), dim=0).values
        self.updates += 1
        return True

    def schedule(self) -> PiecewiseGamma | None:
        """A snapshot of the current knots as a schedule (None before the first fit); rebuild it after
        :meth:`update` returns True."""
        return None if self.knots is None else PiecewiseGamma(self.knots, self.gamma_min, self.gamma_max)

    def state_dict(self) -> dict:
        """Checkpoint state: the statistics and knots (copies), the accepted fits and the γ range."""
        return {"counts": self.counts.clone(), "ce_sums": self.ce_sums.clone(),
                "knots": None if self.knots is None else self.knots.clone(), "updates": self.updates,
                "gamma_min": self.gamma_min, "gamma_max": self.gamma_max}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; the γ range, bins and quantiles must match this curve's. A state
        from before the count-weighted statistics (``ce_ema``) keeps its knots and restarts the statistics."""
        knots = state["knots"]
        bins = (state["ce_sums"] if "ce_sums" in state else state["ce_ema"]).numel()
        found = (state["gamma_min"], state["gamma_max"], bins, self.quantiles if knots is None else knots.numel())
        expected = (self.gamma_min, self.gamma_max, self.bins, self.quantiles)
        if found != expected:
            raise UserError(f"active γ curve state has (gamma_min, gamma_max, bins, quantiles) = {found}, this run "
                            f"expects {expected}: resume with the objective settings the checkpoint was saved with")
        self.knots = None if knots is None else knots.to("cpu", torch.float64).clone()
        if "ce_sums" not in state:
            self.counts, self.ce_sums, self.updates = torch.zeros_like(self.counts), torch.zeros_like(self.ce_sums), 1
            return
        self.counts = state["counts"].to("cpu", torch.float64).clone()
        self.ce_sums = state["ce_sums"].to("cpu", torch.float64).clone()
        self.updates = int(state["updates"])


def isotonic_quantiles(gamma: Tensor, level: Tensor, weights: Tensor, q: Tensor, gamma_min: float,
                       gamma_max: float) -> Tensor:
    """Inverse CDF at quantiles ``q`` [Q] of the empirical curve: the ``weights``-weighted non-decreasing
    regression of ``level`` on ``gamma`` (each Tensor[n], γ ascending), rescaled to [0, 1], read as a CDF that is 0
    at ``gamma_min``, passes through the first bin of each rising step, and is 1 at ``gamma_max``. float64 [Q]."""
    from scipy.optimize import isotonic_regression

    fitted = torch.from_numpy(isotonic_regression(level.numpy(), weights=weights.numpy()).x)
    fitted = (fitted - fitted.min()) / (fitted.max() - fitted.min()).clamp_min(1e-300)
    xs, ps = [gamma_min], [0.0]
    for g, p in zip(gamma.tolist(), fitted.tolist()):
        if gamma_min < g < gamma_max and g > xs[-1] + 1e-5 and p > ps[-1] + 1e-5:
            xs.append(g)
            ps.append(p)
    if ps[-1] < 1.0 - 1e-5:
        xs.append(gamma_max)
        ps.append(1.0)
    knots_p, knots_gamma = torch.tensor(ps, dtype=torch.float64), torch.tensor(xs, dtype=torch.float64)
    upper = torch.searchsorted(knots_p, q, right=True).clamp(1, knots_p.numel() - 1)
    lo_p, hi_p = knots_p[upper - 1], knots_p[upper]
    frac = ((q - lo_p) / (hi_p - lo_p)).clamp(0.0, 1.0)
    return torch.lerp(knots_gamma[upper - 1], knots_gamma[upper], frac)


def make_gamma_schedule(name: str, gamma_min: float, gamma_max: float, active: ActiveGammaCurve | None = None,
                        normal_loc: float = -2.5, normal_scale: float = 2.0,
                        mixture_weights: Sequence[float] = (0.1, 0.2, 0.7), gumbel_loc: float = -2.5,
                        gumbel_scale: float = 2.0) -> GammaSchedule:
    """Build a schedule by name (one of ``GAMMA_SCHEDULES``). The active ones snapshot ``active``'s knots:
    ``active_piecewise`` is its curve, ``active_mixture`` mixes [uniform, normal, active] by ``mixture_weights``.
    Before the curve's first accepted fit its place is taken by the normal component (so ``active_mixture`` gives
    the active weight to the normal law, as the reference does).
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
    normal = NormalGamma(normal_loc, normal_scale, gamma_min, gamma_max)
    learned = active.schedule() or normal  # until the first accepted fit the active part is the normal law
    if name == "active_piecewise":
        return learned
    return MixtureGamma([UniformGamma(gamma_min, gamma_max), normal, learned], mixture_weights)


def active_curve_for(cfg: ObjectiveSection) -> ActiveGammaCurve | None:
    """A fresh adaptive curve for the objective settings ``cfg``, or None when its γ schedule does not use one."""
    if not cfg.gamma_schedule.startswith("active"):
        return None
    a = cfg.active
    return ActiveGammaCurve(cfg.gamma_min, cfg.gamma_max, a.bins, a.quantiles, a.ce_decay, a.rate, a.r2_min,
                            a.estimator, a.min_bins, a.min_examples, a.min_bin_count, a.mask_ratio_min)


def gamma_schedule_for(cfg: ObjectiveSection, curve: ActiveGammaCurve | None) -> GammaSchedule:
    """The training γ distribution of the objective settings ``cfg`` (``curve``: its adaptive curve, if any)."""
    return make_gamma_schedule(cfg.gamma_schedule, cfg.gamma_min, cfg.gamma_max, active=curve,
                               normal_loc=cfg.gamma_loc, normal_scale=cfg.gamma_scale,
                               mixture_weights=cfg.mixture_weights, gumbel_loc=cfg.gamma_loc,
                               gumbel_scale=cfg.gamma_scale)
