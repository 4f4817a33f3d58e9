"""The decision diagnostic during training: accuracy and CE against γ with every position of the validation
blocks corrupted (MLFM.md, "Noise geometry"), measured through the engine, so on every layout.

    record = measure_decision(steps, objective, val, seeds, gammas)   # flow.decision.decision_record form
"""
from __future__ import annotations

import torch

from mlfm_scale.flow.decision import decision_record
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
