import math

import pytest
import torch

from mlfm_scale.errors import UserError
from mlfm_scale.flow.schedules import (
    ActiveGammaCurve,
    GumbelGamma,
    MixtureGamma,
    NormalGamma,
    PiecewiseGamma,
    UniformGamma,
    bridge_time,
    gamma_of_time,
    make_gamma_schedule,
    mask_ratio,
    stratified_uniform,
)

GMIN, GMAX = -10.0, 6.0
F64 = torch.float64


def _logistic(gamma, loc, scale, power):
    return torch.sigmoid((gamma - loc) / scale) ** power


def _schedules():
    q = torch.linspace(0, 1, 11, dtype=F64)
    piecewise = PiecewiseGamma(GMIN + (GMAX - GMIN) * q**2, GMIN, GMAX)
    normal = NormalGamma(-2.5, 2.0, GMIN, GMAX)
    return {
        "uniform": UniformGamma(GMIN, GMAX),
        "normal": normal,
        "gumbel": GumbelGamma(-2.5, 2.0, GMIN, GMAX),
        "piecewise": piecewise,
        "mixture": MixtureGamma([UniformGamma(GMIN, GMAX), normal, piecewise], [0.1, 0.2, 0.7]),
    }


def test_bridge_time_limits_monotonicity_and_inverse():
    sigma = 0.2
    gamma = torch.linspace(-30, 30, 601, dtype=F64)
    t = bridge_time(gamma, sigma)
    assert bool((t.diff() < 0).all())
    assert float(t[0]) > 1 - 1e-10 and float(t[-1]) < 1e-10
    assert float(bridge_time(torch.tensor(math.log(sigma**2), dtype=F64), sigma)) == pytest.approx(0.5, abs=1e-15)
    inner = torch.linspace(GMIN, GMAX, 101, dtype=F64)
    torch.testing.assert_close(gamma_of_time(bridge_time(inner, sigma), sigma), inner, rtol=0, atol=1e-10)


def test_stratified_uniform_hits_every_stratum_once_and_is_seeded():
    n = 64
    u = stratified_uniform(n, torch.Generator().manual_seed(3))
    assert u.shape == (n,) and u.dtype == F64
    assert torch.equal((u * n).floor().long().sort().values, torch.arange(n))
    assert not torch.equal((u * n).floor().long(), torch.arange(n))  # randomly ordered
    assert torch.equal(u, stratified_uniform(n, torch.Generator().manual_seed(3)))
    assert not torch.equal(u, stratified_uniform(n, torch.Generator().manual_seed(4)))


def test_mask_ratio_endpoints_and_shapes():
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    torch.testing.assert_close(mask_ratio(ends), torch.tensor([1.0, 0.05], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(mask_ratio(ends, "uniform", 0.1, 0.9), torch.tensor([0.1, 0.9], dtype=F64))
    u = torch.tensor([0.5], dtype=F64)
    expected = 0.2 + 0.6 * math.cos(math.pi / 4) ** 2
    assert float(mask_ratio(u, p_min=0.2, p_max=0.8, power=2.0)) == pytest.approx(expected, abs=1e-15)
    with pytest.raises(UserError, match="maskgit_cosine"):
        mask_ratio(u, "linear")


@pytest.mark.parametrize("name", list(_schedules()))
def test_schedule_cdf_icdf_pdf_are_consistent(name):
    schedule = _schedules()[name]
    q = torch.linspace(0.001, 0.999, 199, dtype=F64)
    torch.testing.assert_close(schedule.cdf(schedule.icdf(q)), q, rtol=0, atol=1e-9)
    g = torch.linspace(GMIN + 0.013, GMAX - 0.013, 157, dtype=F64)
    torch.testing.assert_close(schedule.icdf(schedule.cdf(g)), g, rtol=0, atol=1e-7)
    dense = torch.linspace(GMIN, GMAX, 40001, dtype=F64)
    assert float(torch.trapezoid(schedule.pdf(dense), dense)) == pytest.approx(1.0, abs=2e-3)
    h = 1e-6
    derivative = (schedule.cdf(g + h) - schedule.cdf(g - h)) / (2 * h)
    torch.testing.assert_close(schedule.pdf(g), derivative, rtol=1e-5, atol=1e-7)
    assert float(schedule.cdf(torch.tensor(GMIN - 1.0))) == 0.0 and float(schedule.cdf(torch.tensor(GMAX + 1))) == 1.0
    gamma = schedule.sample(stratified_uniform(4096, torch.Generator().manual_seed(0)))
    assert float(gamma.min()) >= GMIN and float(gamma.max()) <= GMAX


def test_truncated_normal_matches_its_closed_form():
    schedule = NormalGamma(-2.5, 2.0, GMIN, GMAX)
    normal = torch.distributions.Normal(torch.tensor(-2.5, dtype=F64), torch.tensor(2.0, dtype=F64))
    lo, hi = normal.cdf(torch.tensor(GMIN, dtype=F64)), normal.cdf(torch.tensor(GMAX, dtype=F64))
    g = torch.linspace(GMIN, GMAX, 33, dtype=F64)
    torch.testing.assert_close(schedule.cdf(g), (normal.cdf(g) - lo) / (hi - lo), rtol=0, atol=1e-12)
    torch.testing.assert_close(schedule.pdf(g), normal.log_prob(g).exp() / (hi - lo), rtol=1e-12, atol=0)


def test_schedule_keeps_the_input_dtype():
    u32 = torch.tensor([0.25, 0.75])
    assert UniformGamma(GMIN, GMAX).sample(u32).dtype == torch.float32
    torch.testing.assert_close(UniformGamma(GMIN, GMAX).sample(u32), torch.tensor([-6.0, 2.0]))


def test_make_gamma_schedule_builds_each_kind():
    active = ActiveGammaCurve(GMIN, GMAX)
    for name in ("uniform", "normal", "gumbel", "active_piecewise", "active_mixture"):
        schedule = make_gamma_schedule(name, GMIN, GMAX, active=active)
        assert (schedule.gamma_min, schedule.gamma_max) == (GMIN, GMAX)
    mixture = make_gamma_schedule("active_mixture", GMIN, GMAX, active=active)
    assert isinstance(mixture, MixtureGamma) and mixture.weights == pytest.approx([0.1, 0.2, 0.7])
    with pytest.raises(UserError, match="ActiveGammaCurve"):
        make_gamma_schedule("active_piecewise", GMIN, GMAX)
    with pytest.raises(UserError, match="unknown γ schedule"):
        make_gamma_schedule("cosine", GMIN, GMAX)


# ------------------------------------------------------------------------------------- active curve
LOC, SCALE, POWER = -2.0, 1.0, 1.5


def _feed(curve, ce_of_gamma, calls=300, batch=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(calls):
        gamma = GMIN + (GMAX - GMIN) * torch.rand(batch, generator=generator, dtype=F64)
        curve.observe(gamma, ce_of_gamma(gamma, generator))


def _logistic_ce(gamma, generator):
    noise = 0.05 * torch.randn(gamma.shape, generator=generator, dtype=F64)
    return 2.0 + 5.0 * _logistic(gamma, LOC, SCALE, POWER) + noise


def test_active_curve_recovers_a_generalised_logistic():
    curve = ActiveGammaCurve(GMIN, GMAX)
    _feed(curve, _logistic_ce)
    gamma, ce = curve.ce_curve()
    assert gamma.numel() == curve.bins  # bias correction: the EMA sits on the true curve, not toward 0
    torch.testing.assert_close(ce, 2.0 + 5.0 * _logistic(gamma, LOC, SCALE, POWER), rtol=0, atol=0.05)
    knots = curve.target_knots()
    assert knots is not None and knots.shape == (curve.quantiles,)
    assert (float(knots[0]), float(knots[-1])) == (GMIN, GMAX) and bool((knots.diff() >= 0).all())
    true_median = LOC + SCALE * math.log(0.5 ** (1 / POWER) / (1 - 0.5 ** (1 / POWER)))
    assert float(knots[50]) == pytest.approx(true_median, abs=0.1)
    dense = torch.linspace(GMIN, GMAX, 2001, dtype=F64)
    true = _logistic(dense, LOC, SCALE, POWER)
    true = (true - true[0]) / (true[-1] - true[0])
    implied = PiecewiseGamma(knots, GMIN, GMAX).cdf(dense)
    assert float((implied - true).abs().max()) < 0.02


def test_active_curve_rejects_a_flat_noisy_curve():
    curve = ActiveGammaCurve(GMIN, GMAX)
    _feed(curve, lambda g, gen: 3.0 + 0.05 * torch.randn(g.shape, generator=gen, dtype=F64), calls=50)
    before = curve.knots.clone()
    assert curve.target_knots() is None
    assert curve.update() is False and torch.equal(curve.knots, before)


def test_active_curve_ignores_unseen_bins_and_update_moves_by_rate():
    curve = ActiveGammaCurve(GMIN, GMAX, rate=0.25)
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):
        gamma = -6.0 + 8.0 * torch.rand(256, generator=generator, dtype=F64)  # half the range never seen
        curve.observe(gamma, _logistic_ce(gamma, generator))
    seen, _ = curve.ce_curve()
    assert 0 < seen.numel() < curve.bins and float(seen.min()) > -6.1 and float(seen.max()) < 2.1
    before, target = curve.knots.clone(), curve.target_knots()
    assert target is not None
    assert curve.update() is True
    torch.testing.assert_close(curve.knots, before + 0.25 * (target - before), rtol=0, atol=1e-12)
    assert torch.equal(curve.schedule().knots, curve.knots)


def test_active_curve_state_round_trips_exactly():
    curve = ActiveGammaCurve(GMIN, GMAX, bins=32, quantiles=21)
    _feed(curve, _logistic_ce, calls=40)
    curve.update()
    restored = ActiveGammaCurve(GMIN, GMAX, bins=32, quantiles=21)
    restored.load_state_dict(curve.state_dict())
    for key, value in curve.state_dict().items():
        other = restored.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    assert torch.equal(restored.target_knots(), curve.target_knots())
    with pytest.raises(UserError, match="bins"):
        ActiveGammaCurve(GMIN, GMAX, bins=16, quantiles=21).load_state_dict(curve.state_dict())
