import math

import pytest
import torch

from mlfm_scale.flow.decision import (
    DecisionWindow,
    decision_record,
    decision_window,
    misplacement_warning,
    trajectory_end,
    window_of,
)
from mlfm_scale.flow.schedules import NormalGamma

F64 = torch.float64


def test_window_reads_the_crossings_of_a_known_profile():
    gamma = torch.linspace(-10, 6, 17, dtype=F64)
    accuracy = 0.1 + 0.9 * torch.sigmoid(-(gamma - 1.0) / 0.5)  # falls from 1 to 0.1 around γ = 1
    w = decision_window(gamma, accuracy)
    level = (accuracy - accuracy.min()) / (accuracy.max() - accuracy.min())
    assert w.low < w.mid < w.high
    assert w.mid == pytest.approx(1.0, abs=0.15)  # linear interpolation on a 1-wide grid
    assert -0.5 < w.low < 1.0 < w.high < 2.5
    assert float(level[gamma <= w.low - 1].min()) >= 0.9 and float(level[gamma >= w.high + 1].max()) <= 0.1


def test_noise_in_the_flat_tail_cannot_move_the_window():
    gamma = torch.linspace(-4, 4, 9, dtype=F64)
    clean = torch.tensor([1.0, 1.0, 1.0, 0.8, 0.3, 0.1, 0.1, 0.1, 0.1], dtype=F64)
    bumpy = clean.clone()
    bumpy[7] = 0.25  # a noisy bump at high noise, after the fall
    assert decision_window(gamma, bumpy) == decision_window(gamma, clean)


def test_flat_or_single_point_profiles_have_no_window():
    gamma = torch.linspace(-4, 4, 9, dtype=F64)
    assert decision_window(gamma, torch.full_like(gamma, 0.3)) is None
    assert decision_window(gamma[:1], gamma[:1]) is None
    record = decision_record(gamma, torch.full_like(gamma, 0.3), torch.ones_like(gamma))
    assert record["window"] is None and window_of(record) is None and window_of(None) is None


def test_misplaced_window_warns_and_a_central_one_does_not():
    law = NormalGamma(-2.5, 2.0, -10.0, 6.0)  # central 80 %: about [−5.06, 0.06]
    assert misplacement_warning(DecisionWindow(-4.0, -2.0, 0.0), law) is None
    message = misplacement_warning(DecisionWindow(0.0, 2.0, 4.0), law)
    assert message is not None and "embedding_std" in message and "[0.00, 4.00]" in message


def test_trajectory_end_prefers_the_window_then_the_law_median():
    law = NormalGamma(-2.5, 2.0, -10.0, 6.0)
    assert trajectory_end(DecisionWindow(-3.0, -1.5, 0.0), law, 6.0) == (-1.5, "decision_window")
    value, source = trajectory_end(None, law, 6.0)
    assert source == "gamma_law_median" and value == pytest.approx(-2.5, abs=1e-9)
    assert trajectory_end(DecisionWindow(5.0, 5.9, 6.0), law, 6.0)[0] == pytest.approx(5.5)  # below the start


def test_record_round_trips_through_json_form():
    gamma = torch.linspace(-4, 4, 9, dtype=F64)
    accuracy = torch.tensor([1.0, 1.0, 0.9, 0.6, 0.3, 0.1, 0.05, 0.05, 0.05], dtype=F64)
    record = decision_record(gamma, accuracy, -torch.log(accuracy))
    assert window_of(record) == decision_window(gamma, accuracy)
    assert record["gamma"] == pytest.approx(gamma.tolist()) and not math.isnan(record["ce"][0])
