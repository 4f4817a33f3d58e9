"""Where a network decides its tokens (MLFM.md, "Noise geometry"): the decision window in γ.

With every position of a block corrupted at one γ, the token accuracy falls from ≈1 (low noise) to chance (high
noise). The *decision window* is the γ range over which it falls: σ and the γ settings only mean something when
that window lies under the training γ law's mass and the sampler's trajectories end inside it.

    profile: γ [K] ascending → accuracy [K], CE [K]        (measured by the caller: training or an export)
    decision_window(γ, accuracy) → DecisionWindow(low, mid, high)
    decision_record(γ, accuracy, CE) → the JSON form kept in checkpoints, metrics and an export's config.json
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mlfm_scale.flow.schedules import GammaSchedule

WINDOW_LEVELS = (0.9, 0.5, 0.1)  # normalised accuracy at the window's low end, middle and high end


@dataclass(frozen=True)
class DecisionWindow:
    """γ where the normalised accuracy ``(acc − acc_min)/(acc_max − acc_min)`` falls to 0.9 (``low``), 0.5
    (``mid``) and 0.1 (``high``); low ≤ mid ≤ high."""

    low: float
    mid: float
    high: float

    def to_dict(self) -> dict:
        return asdict(self)

    def inside(self, lo: float, hi: float) -> bool:
        """Whether the whole window lies within ``[lo, hi]``."""
        return lo <= self.low and self.high <= hi


def level_crossing(gamma: Tensor, level: Tensor, target: float) -> float:
    """The first γ at which a non-increasing ``level`` [K] (over ascending ``gamma`` [K]) reaches ``target``,
    linear between grid points; the grid's ends when it never crosses."""
    below = (level <= target).nonzero().flatten()
    if not below.numel():
        return float(gamma[-1])
    k = int(below[0])
    if k == 0:
        return float(gamma[0])
    a, b = float(level[k - 1]), float(level[k])
    frac = (a - target) / (a - b) if a > b else 1.0
    return float(gamma[k - 1] + frac * (gamma[k] - gamma[k - 1]))


def decision_window(gamma: Tensor, accuracy: Tensor) -> DecisionWindow | None:
    """The decision window of an accuracy profile: ``gamma`` [K] ascending, ``accuracy`` [K] in [0, 1] measured
    with every position corrupted at each γ. None when the accuracy does not change over the grid (K < 2, or a
    flat profile: no decision happens on it). The profile is made non-increasing (running minimum from the clean
    end) before the crossings are read, so noise in a flat tail cannot move them."""
    gamma = gamma.detach().to(torch.float64).flatten()
    accuracy = accuracy.detach().to(torch.float64).flatten()
    if gamma.numel() < 2 or not float(accuracy.max() - accuracy.min()) > 1e-6:
        return None
    level = (accuracy - accuracy.min()) / (accuracy.max() - accuracy.min())
    level = torch.cummin(level, dim=0).values
    low, mid, high = (level_crossing(gamma, level, target) for target in WINDOW_LEVELS)
    return DecisionWindow(low, mid, high)


def decision_record(gammas: Tensor, accuracy: Tensor, ce: Tensor) -> dict:
    """A profile (each Tensor[K], γ ascending) and its window as JSON-ready values (``window`` None when
    nothing is decided on the grid)."""
    window = decision_window(gammas, accuracy)
    return {"gamma": gammas.tolist(), "accuracy": accuracy.tolist(), "ce": ce.tolist(),
            "window": None if window is None else window.to_dict()}


def window_of(record: dict | None) -> DecisionWindow | None:
    """The window of a :func:`decision_record` (None when there is no record or no window)."""
    return None if record is None or record.get("window") is None else DecisionWindow(**record["window"])


def central_range(schedule: GammaSchedule, mass: float = 0.8) -> tuple[float, float]:
    """The γ interval holding the central ``mass`` of the training law (its quantiles (1 ∓ mass)/2)."""
    ends = schedule.icdf(torch.tensor([(1 - mass) / 2, (1 + mass) / 2], dtype=torch.float64))
    return float(ends[0]), float(ends[1])


def misplacement_warning(window: DecisionWindow, schedule: GammaSchedule, mass: float = 0.8) -> str | None:
    """A message when ``window`` does not lie within the central ``mass`` of the training γ law (training then
    spends its samples where nothing is decided), else None."""
    lo, hi = central_range(schedule, mass)
    if window.inside(lo, hi):
        return None
    return (f"the model decides its tokens at γ ∈ [{window.low:.2f}, {window.high:.2f}], outside the central "
            f"{mass:.0%} of the training γ law [{lo:.2f}, {hi:.2f}]: training spends its samples where nothing is "
            "decided. Check model.embedding_std (σ and the γ settings are tuned for a table of per-dimension std "
            "√(2/(5d)), MLFM.md 'Noise geometry'), or move objective.gamma_loc / the γ range onto the window")


def trajectory_end(window: DecisionWindow | None, schedule: GammaSchedule, gamma_max: float) -> tuple[float, str]:
    """``sample.gamma_min=auto``: (γ where each sampler trajectory ends, what it came from). The middle of the
    model's decision window, where half of what is decided over the window is decided, so promotion takes the
    tokens the model is sure of and leaves the rest to the next round (``decision_window``); without a measured
    window, the median of the training γ law, which the adaptive curve moves onto the window
    (``gamma_law_median``). Kept below ``gamma_max`` (the grid's start)."""
    if window is not None:
        value, source = window.mid, "decision_window"
    else:
        value, source = float(schedule.icdf(torch.tensor(0.5, dtype=torch.float64))), "gamma_law_median"
    return min(value, gamma_max - 0.5), source
