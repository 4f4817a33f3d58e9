"""The sampling γ grid from the training γ distribution."""
import torch

from mlfm_scale.flow.schedules import ActiveGammaCurve, NormalGamma, UniformGamma, make_gamma_schedule
from mlfm_scale.sample.grid import gamma_grid


def test_grid_runs_from_the_99th_percentile_down_to_gamma_min_within_the_sampling_range():
    grid = gamma_grid(UniformGamma(-10.0, 6.0), 4, -6.0, 6.0)
    # uniform restricted to [−6, 6]: icdf at q = 0.99, 0.7425, 0.495, 0.2475, then γ_min
    expected = torch.tensor([5.88, 2.91, -0.06, -3.03, -6.0], dtype=torch.float64)
    torch.testing.assert_close(grid, expected, atol=1e-3, rtol=0)
    wide = gamma_grid(NormalGamma(-2.5, 2.0, -10.0, 6.0), 64, -6.0, 6.0)
    assert (wide.diff() < 0).all()  # no step spent on a repeated point
    normal = NormalGamma(-2.5, 2.0, -10.0, 6.0)
    q = torch.linspace(0.99, 1e-6, 5, dtype=torch.float64)
    at_min = float(normal.cdf(torch.tensor(-10.0, dtype=torch.float64)))  # the clamped law's point mass at −10
    torch.testing.assert_close(gamma_grid(normal, 4, -10.0, 6.0)[:4], normal.icdf(at_min + q * (1 - at_min))[:4])


def test_grid_follows_the_learned_curve():
    curve = ActiveGammaCurve(-10.0, 6.0)
    curve.knots = torch.linspace(-1.0, 1.0, curve.quantiles, dtype=torch.float64)  # all mass on [−1, 1]
    learned = gamma_grid(make_gamma_schedule("active_piecewise", -10.0, 6.0, active=curve), 8, -6.0, 6.0)
    assert (learned[:-1] >= -1.0).all() and (learned[:-1] <= 1.0).all() and (learned.diff() < 0).all()
    normal = gamma_grid(NormalGamma(-2.5, 2.0, -10.0, 6.0), 8, -6.0, 6.0)
    assert not torch.allclose(learned, normal)


def test_the_papers_grid_clamps_the_training_quantiles():
    """MLFM.md: γ_k = icdf(q_k) of the training law, clamped to the sampling range, the last point γ_min."""
    law = UniformGamma(-10.0, 6.0)
    paper = gamma_grid(law, 4, -6.0, 6.0, "paper")
    q = torch.linspace(0.99, 1e-6, 5, dtype=torch.float64)
    expected = (-10.0 + 16.0 * q).clamp(-6.0, 6.0)
    expected[-1] = -6.0
    torch.testing.assert_close(paper, expected)
    assert paper[-2] == paper[-1] == -6.0  # a clamped point repeats: a step that moves nothing
    restricted = gamma_grid(law, 4, -6.0, 6.0)
    assert len(set(restricted.tolist())) == 5
