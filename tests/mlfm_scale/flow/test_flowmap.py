"""The bridge's flow map X_{s,t} and the weights that compose two half-jumps into one (MLFM.md, "Flow-map
distillation"), checked symbolically, numerically and against the ODE it integrates."""
import sympy
import torch

from mlfm_scale.flow.bridge import flow_drift
from mlfm_scale.flow.flowmap import composition_weights, flow_map, jump_ratio

F64 = torch.float64


def test_the_weights_compose_two_exact_half_jumps_into_one_symbolically():
    a, b, c, z, m, d1, d2 = sympy.symbols("a b c z m d1 d2", positive=True)
    s, u, t = 1 / (1 + a), 1 / (1 + b), 1 / (1 + c)  # any times in (0, 1): the square roots' arguments are positive
    r = lambda p, q: sympy.sqrt(q * (1 - q) / (p * (1 - p)))
    x = lambda y, d, p, q: (1 - q) * m + q * d + r(p, q) * (y - (1 - p) * m - p * d)
    w1 = (u * r(u, t) - s * r(s, t)) / (t - s * r(s, t))
    w2 = (t - u * r(u, t)) / (t - s * r(s, t))
    difference = x(x(z, d1, s, u), d2, u, t) - x(z, w1 * d1 + w2 * d2, s, t)
    assert sympy.simplify(sympy.powsimp(sympy.expand(difference), force=True)) == 0
    assert sympy.simplify(w1 + w2 - 1) == 0
    # w₁ ≥ 0 ⇔ u·r_{ut} ≥ s·r_{st} ⇔ u/(1−u) ≥ s/(1−s) ⇔ u ≥ s;  w₂ ≥ 0 ⇔ t ≥ u·r_{ut} ⇔ t ≥ u
    assert sympy.simplify((u * r(u, t)) ** 2 - u / (1 - u) * t * (1 - t)) == 0
    assert sympy.simplify(t**2 - (u * r(u, t)) ** 2 - t * (t - u) / (1 - u)) == 0


def test_composition_matches_one_jump_numerically_and_the_weights_are_a_convex_pair():
    g = torch.Generator().manual_seed(0)
    z, d1, d2 = (torch.randn(16, 5, 8, generator=g, dtype=F64) for _ in range(3))
    m = torch.randn(8, generator=g, dtype=F64)
    s = torch.rand(16, generator=g, dtype=F64) * 0.5 + 1e-4
    t = s + (1 - s) * torch.rand(16, generator=g, dtype=F64) * 0.999
    u = (s + t) / 2
    w1, w2 = composition_weights(s, u, t)
    assert bool((w1 >= 0).all() and (w2 >= 0).all()) and float((w1 + w2 - 1).abs().max()) < 1e-12
    composed = flow_map(flow_map(z, d1, m, s, u), d2, m, u, t)
    d_star = w1.view(-1, 1, 1) * d1 + w2.view(-1, 1, 1) * d2
    assert float((composed - flow_map(z, d_star, m, s, t)).abs().max()) < 1e-6
    same = flow_map(flow_map(z, d1, m, s, u), d1, m, u, t)  # D = D*: the half-jumps are the whole jump
    assert float((same - flow_map(z, d1, m, s, t)).abs().max()) < 1e-6


def test_edge_midpoints_put_all_weight_on_one_half():
    s, t = torch.tensor([0.2], dtype=F64), torch.tensor([0.7], dtype=F64)
    assert [float(w) for w in composition_weights(s, s, t)] == [0.0, 1.0]  # u = s: the first half moves nothing
    w1, w2 = composition_weights(s, t, t)  # u = t: the second half moves nothing
    assert abs(float(w1) - 1) < 1e-12 and abs(float(w2)) < 1e-12
    z, d = torch.randn(1, 3, 4, dtype=F64), torch.randn(1, 3, 4, dtype=F64)
    m = torch.randn(4, dtype=F64)
    assert torch.allclose(flow_map(z, d, m, s, s), z)  # a jump of length zero
    assert float(jump_ratio(0.3, 0.3)) == 1.0


def test_the_map_integrates_the_probability_flow_ode_for_a_fixed_estimate():
    g = torch.Generator().manual_seed(1)
    z0, d = torch.randn(2, 3, 4, generator=g, dtype=F64), torch.randn(2, 3, 4, generator=g, dtype=F64)
    m = torch.randn(4, generator=g, dtype=F64)
    s, t, n = 0.05, 0.9, 10_000
    z, dt = z0.clone(), (t - s) / n
    for k in range(n):  # midpoint Euler on the drift with x̂1 = D held fixed
        tk = s + k * dt
        half = z + 0.5 * dt * flow_drift(z, d, m, tk)
        z = z + dt * flow_drift(half, d, m, tk + 0.5 * dt)
    exact = flow_map(z0, d, m, s, t)
    assert float((z - exact).norm() / exact.norm()) < 1e-3


def test_the_state_stays_float32_for_a_float32_input():
    z = torch.randn(2, 3, 4)
    out = flow_map(z, torch.randn(2, 3, 4), torch.randn(4), torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.6]))
    assert out.dtype == torch.float32
