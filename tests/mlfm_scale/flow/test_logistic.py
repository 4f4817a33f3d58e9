import pytest
import torch

from mlfm_scale.flow.logistic import fit_generalised_logistic, generalised_logistic, generalised_logistic_inverse

F64 = torch.float64


@pytest.mark.parametrize("loc, scale, power", [(-1.0, 0.7, 3.0), (3.0, 2.5, 0.3), (-6.0, 1.0, 1.0)])
def test_fit_recovers_noiseless_parameters(loc, scale, power):
    x = torch.linspace(-10, 6, 128, dtype=F64)
    fit = fit_generalised_logistic(x, generalised_logistic(x, loc, scale, power))
    assert fit is not None and fit.r2 == pytest.approx(1.0, abs=1e-10)
    assert (fit.loc, fit.scale, fit.power) == pytest.approx((loc, scale, power), rel=1e-6, abs=1e-6)


def test_inverse_inverts():
    y = torch.linspace(0.01, 0.99, 99, dtype=F64)
    x = generalised_logistic_inverse(y, -2.0, 1.5, 0.4)
    torch.testing.assert_close(generalised_logistic(x, -2.0, 1.5, 0.4), y, rtol=0, atol=1e-12)


def test_degenerate_inputs_give_none():
    x = torch.linspace(0, 1, 10, dtype=F64)
    assert fit_generalised_logistic(x, torch.full_like(x, 0.3)) is None
    assert fit_generalised_logistic(x[:3], x[:3]) is None
