"""The decision diagnostic during training: accuracy and CE against γ with every position of the validation
blocks corrupted (MLFM.md, "Noise geometry"), measured through the engine, so on every layout.

    record = measure_decision(steps, objective, val, seeds, gammas)   # flow.decision.decision_record form
    monitor = DecisionMonitor(gammas, warn=rank == 0)                  # the same, per evaluation of a run
"""
from __future__ import annotations

import sys

import torch

from mlfm_scale.flow.decision import decision_record, misplacement_warning, window_of
from mlfm_scale.parallel.pipeline import STEP_ROWS

_CE, _TOKENS, _ACCURACY = (STEP_ROWS.index(k) for k in ("ce", "tokens", "accuracy"))


def measure_decision(steps, objective, batches: list, seeds: list[int], gammas: torch.Tensor) -> dict:
    """Evaluate ``batches`` (fixed ``seeds``) once per γ of ``gammas`` [K] (ascending) under
    ``objective.probing(γ)``; per γ the token-weighted means of the rows' accuracy and CE over all DP ranks.
    Collective: every rank calls it with the same γ grid."""
    accuracy, ce = [], []
    for gamma in gammas.tolist():
        with objective.probing(gamma):
            _, rows = steps.evaluate(batches, seeds)
        weight = rows[_TOKENS].double()
        accuracy.append(float((rows[_ACCURACY].double() * weight).sum() / weight.sum()))
        ce.append(float((rows[_CE].double() * weight).sum() / weight.sum()))
    return decision_record(gammas, torch.tensor(accuracy, dtype=torch.float64), torch.tensor(ce, dtype=torch.float64))


class DecisionMonitor:
    """The diagnostic at each evaluation of a training run: the latest profile (a registered, resumable
    component), its window's scalars, and a warning once the window sits outside the central 80 % of the
    training γ law at two evaluations in a row (early on a model reads tokens only at low noise)."""

    def __init__(self, gammas: torch.Tensor | None, warn: bool):
        self.gammas, self.warn = gammas, warn  # gammas None: off (MDM training has no γ to probe)
        self.profile: dict | None = None
        self.misplaced = self.warned = False

    def measure(self, steps, objective, batches: list, seeds: list[int], step: int) -> dict[str, float]:
        """Collective: measure the profile; returns the window's scalars for the metrics."""
        if self.gammas is None:
            return {}
        self.profile = measure_decision(steps, objective, batches, seeds, self.gammas)
        window = window_of(self.profile)
        if window is None:
            return {}
        message = misplacement_warning(window, objective.schedule)
        if message is not None and self.misplaced and not self.warned and self.warn:
            print(f"WARNING (step {step}): {message}", file=sys.stderr, flush=True)
            self.warned = True
        self.misplaced = message is not None
        return {**{f"decision_{k}": v for k, v in window.to_dict().items()},
                "decision_misplaced": float(self.misplaced)}

    def state_dict(self) -> dict | None:
        return self.profile

    def load_state_dict(self, state: dict | None) -> None:
        self.profile = state
