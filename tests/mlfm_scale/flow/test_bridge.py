import math

import pytest
import torch

from mlfm_scale.flow.bridge import (
    RowGenerators,
    bridge_forward,
    flow_drift,
    for_rows,
    normal,
    sample_corrupted,
    sde_step,
    uniform,
)

F64 = torch.float64
SIGMA = 0.2


def _embeddings(batch, length, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    e = 2.0 + torch.randn(batch, length, width, generator=generator, dtype=F64)
    m = -1.0 + torch.randn(width, generator=generator, dtype=F64)
    return e, m


def _standardised(z, e, m, t):
    """(z − mean)/std under the bridge marginal at t (Tensor[B]); N(0, 1) entries when z is on the bridge."""
    t = t.view(-1, 1, 1)
    return (z - (1 - t) * m - t * e) / (SIGMA * torch.sqrt(t * (1 - t)))


def _assert_standard_normal_per_row(r):
    """Each row of r [B, …] has mean 0 and variance 1 within 5 standard errors."""
    n = r[0].numel()
    flat = r.flatten(1)
    assert float(flat.mean(dim=1).abs().max()) < 5 / math.sqrt(n)
    assert float((flat.var(dim=1) - 1).abs().max()) < 5 * math.sqrt(2 / n)


def test_sample_corrupted_rate_validity_and_forcing():
    generator = torch.Generator().manual_seed(0)
    batch, length = 5, 20000
    valid = torch.rand(batch, length, generator=generator) < 0.8
    p = torch.tensor([0.05, 0.3, 0.5, 0.9, 1.0])
    corrupted = sample_corrupted(valid, p, generator)
    assert not bool((corrupted & ~valid).any())
    rate = corrupted.sum(1) / valid.sum(1)
    n = valid.sum(1).double()
    assert bool(((rate.double() - p.double()).abs() <= 5 * torch.sqrt(p * (1 - p) / n) + 1e-12).all())


def test_sample_corrupted_forces_one_uniformly_chosen_valid_position():
    rows, length = 20000, 6
    valid = torch.tensor([True, False, True, True, False, True]).expand(rows, length).clone()
    valid[0] = False  # a row without valid positions stays empty
    corrupted = sample_corrupted(valid, torch.zeros(rows), torch.Generator().manual_seed(1))
    assert not bool(corrupted[0].any())
    assert bool((corrupted[1:].sum(1) == 1).all()) and not bool((corrupted & ~valid).any())
    counts = corrupted[1:].sum(0)[valid[1]].double()  # four valid slots, each ≈ 1/4 of the rows
    expected = (rows - 1) / 4
    assert float((counts - expected).abs().max()) < 5 * math.sqrt(expected * 0.75)


def test_bridge_forward_matches_the_marginal_and_keeps_observed_positions():
    e, m = _embeddings(4, 500, 100)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=F64)
    z = bridge_forward(e, m, t, torch.ones(4, 500, dtype=torch.bool), SIGMA, torch.Generator().manual_seed(2))
    _assert_standard_normal_per_row(_standardised(z, e, m, t))
    assert float(torch.corrcoef(torch.stack([_standardised(z, e, m, t).flatten(), e.flatten()]))[0, 1]) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bridge_forward_observed_positions_are_bit_exact(dtype):
    e, m = (x.to(dtype) for x in _embeddings(3, 40, 16))
    corrupted = torch.rand(3, 40, generator=torch.Generator().manual_seed(3)) < 0.5
    z = bridge_forward(e, m, torch.tensor([0.2, 0.5, 0.8]), corrupted, SIGMA, torch.Generator().manual_seed(4))
    assert z.dtype == torch.float32 and torch.equal(z[~corrupted], e[~corrupted].float())
    assert not bool((z[corrupted] == e[corrupted].float()).all(dim=-1).any())


def test_z_is_computed_in_fp32_under_bf16_compute():
    """At low t the token signal t·(e − m) is far below bf16's resolution of z ≈ m: z and the SDE state must be
    float32 so the network (which casts once) and many small sampler steps do not lose it."""
    e, m = (x.to(torch.bfloat16) for x in _embeddings(2, 30, 16))
    t = torch.tensor([1e-3, 2e-3])
    z = bridge_forward(e, m, t, torch.ones(2, 30, dtype=torch.bool), SIGMA, torch.Generator().manual_seed(4))
    eps = torch.randn(e.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float32).double()
    tt = t.double()[:, None, None]
    exact = (1 - tt) * m.double() + tt * e.double() + SIGMA * torch.sqrt(tt * (1 - tt)) * eps
    assert z.dtype == torch.float32
    assert float((z.double() - exact).abs().max()) < 1e-6
    assert float((z.to(torch.bfloat16).double() - exact).abs().max()) > 1e-4  # what bf16 would have kept
    step = sde_step(z, e.float(), 1e-3, 1.1e-3, SIGMA, torch.Generator().manual_seed(5))
    assert step.dtype == torch.float32


def test_bridge_noise_does_not_depend_on_other_positions_masks():
    e, m = _embeddings(2, 30, 8)
    t = torch.tensor([0.4, 0.7], dtype=F64)
    some = torch.rand(2, 30, generator=torch.Generator().manual_seed(5)) < 0.5
    z_some = bridge_forward(e, m, t, some, SIGMA, torch.Generator().manual_seed(6))
    z_all = bridge_forward(e, m, t, torch.ones_like(some), SIGMA, torch.Generator().manual_seed(6))
    assert torch.equal(z_some[some], z_all[some])


def test_sde_step_with_true_x0_maps_the_marginal_at_t_onto_t_next():
    e, m = _embeddings(4, 500, 100, seed=7)
    generator = torch.Generator().manual_seed(8)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=F64)
    t_next = torch.tensor([0.6, 0.35, 0.9, 0.99], dtype=F64)
    z = bridge_forward(e, m, t, torch.ones(4, 500, dtype=torch.bool), SIGMA, generator)
    z_next = sde_step(z, e, t, t_next, SIGMA, generator)
    _assert_standard_normal_per_row(_standardised(z_next, e, m, t_next))


def test_sde_step_to_t_one_lands_on_x0_without_noise():
    e, m = _embeddings(2, 10, 4)
    generator = torch.Generator().manual_seed(9)
    z = bridge_forward(e, m, 0.5, torch.ones(2, 10, dtype=torch.bool), SIGMA, generator)
    torch.testing.assert_close(sde_step(z, e, 0.5, 1.0, SIGMA, generator), e, rtol=0, atol=1e-12)


def test_flow_drift_is_the_mean_velocity_on_the_noise_free_path():
    e, m = _embeddings(3, 5, 4)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    mean = (1 - t.view(-1, 1, 1)) * m + t.view(-1, 1, 1) * e
    torch.testing.assert_close(flow_drift(mean, e, m, t), (e - m).expand_as(e), rtol=0, atol=1e-12)


def test_flow_drift_ode_transports_the_bridge_marginal():
    e, m = _embeddings(1, 1000, 100, seed=10)
    t0, t1, steps = 0.1, 0.6, 500
    z = bridge_forward(e, m, torch.tensor([t0], dtype=F64), torch.ones(1, 1000, dtype=torch.bool), SIGMA,
                       torch.Generator().manual_seed(11))
    h = (t1 - t0) / steps
    for k in range(steps):  # Heun (second order) so the step error is far below the Monte-Carlo error
        t = t0 + k * h
        drift = flow_drift(z, e, m, t)
        guess = z + h * drift
        z = z + 0.5 * h * (drift + flow_drift(guess, e, m, t + h))
    _assert_standard_normal_per_row(_standardised(z, e, m, torch.tensor([t1], dtype=F64)))


def test_a_plain_generator_draws_as_torch_does():
    assert torch.equal(normal((2, 3, 4), torch.Generator().manual_seed(5), "cpu", F64),
                       torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5), dtype=F64))
    assert torch.equal(uniform((2, 3), torch.Generator().manual_seed(5), "cpu"),
                       torch.rand(2, 3, generator=torch.Generator().manual_seed(5)))
    generator = torch.Generator()
    assert for_rows(generator, torch.tensor([1])) is generator


def test_row_generators_draw_each_row_over_its_own_width_from_its_own_stream():
    streams = RowGenerators.seeded([3, 4, 5], [2, 4, 1], "cpu")
    draw = normal((3, 4, 2), streams, "cpu")
    for row, (seed, width) in enumerate([(3, 2), (4, 4), (5, 1)]):
        assert torch.equal(draw[row, :width], torch.randn(width, 2, generator=torch.Generator().manual_seed(seed)))
        assert not draw[row, width:].any()
    assert torch.equal(normal((3, 6, 2), RowGenerators.seeded([3, 4, 5], [2, 4, 1], "cpu"), "cpu")[:, :4], draw)


def test_a_sub_batch_advances_the_same_streams():
    streams = RowGenerators.seeded([3, 4, 5], [2, 2, 2], "cpu")
    first = uniform((2, 2), streams.rows(torch.tensor([2, 0])), "cpu")
    second = uniform((3, 2), streams, "cpu")
    alone = torch.Generator().manual_seed(5)  # row 2's stream: the sub-batch's draw, then the whole batch's
    assert torch.equal(first[0], torch.rand(2, generator=alone))
    assert torch.equal(second[2], torch.rand(2, generator=alone))
    assert torch.equal(second[1], torch.rand(2, generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="2 rows from 3"):
        uniform((2, 2), streams, "cpu")
