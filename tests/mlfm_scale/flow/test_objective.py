import math

import pytest
import torch

from mlfm_scale.flow.objective import (
    embedding_mse,
    masked_loss,
    per_position_ce,
    posterior_mean_embedding,
    sft_loss,
    token_diagnostics,
    velocity,
    velocity_mse_weight,
)

F64 = torch.float64
CE = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]], dtype=F64)
CORRUPTED = torch.tensor([[True, False, True, False], [False, False, False, True], [False] * 4])
VALID = torch.tensor([[True, True, True, False], [True, True, True, True], [True, True, False, False]])
P = torch.tensor([0.5, 0.25, 0.8], dtype=F64)


def test_inverse_count_is_the_mean_of_per_row_means_over_rows_with_corruption():
    assert float(masked_loss(CE, CORRUPTED, P, VALID, "inverse_count")) == pytest.approx(((1 + 3) / 2 + 8) / 2)


def test_inverse_p_divides_by_p_and_the_batch_valid_count():
    expected = ((1 + 3) / 0.5 + 8 / 0.25 + 0.0) / (3 + 4 + 2)
    assert float(masked_loss(CE, CORRUPTED, P, VALID, "inverse_p")) == pytest.approx(expected)


def test_none_reduction_and_invalid_positions_are_ignored():
    corrupted = CORRUPTED.clone()
    corrupted[0, 3] = True  # corrupted but invalid: ignored
    ce = CE.clone()
    ce[1, 0] = float("nan")  # not corrupted: cannot leak into the loss
    assert float(masked_loss(ce, corrupted, P, VALID, "none")) == pytest.approx((1 + 3 + 8) / 3)
    assert float(masked_loss(ce, corrupted, P, VALID, "inverse_count")) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="inverse_count"):
        masked_loss(CE, CORRUPTED, P, VALID, "sum")


def test_scalar_reductions_of_an_empty_batch_are_zero_with_a_gradient():
    ce = CE.clone().requires_grad_()
    loss = masked_loss(ce, torch.zeros_like(CORRUPTED), P, VALID, "inverse_count")
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(ce.grad, torch.zeros_like(CE))


def test_sft_loss_is_llada_normalised():
    response = torch.tensor([[False, True, True, True], [False, False, True, True], [False] * 4])
    corrupted = torch.tensor([[True, True, False, True], [False, False, True, True], [False] * 4])
    expected = ((2 + 4) / (0.5 * 3) + (7 + 8) / (0.25 * 2) + 0.0) / 3
    assert float(sft_loss(CE, corrupted, P, response)) == pytest.approx(expected)


def test_posterior_mean_of_a_confident_logit_is_that_embedding():
    table = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(2, 3, 7)
    logits[..., 4] = 50.0
    torch.testing.assert_close(posterior_mean_embedding(logits, table), table[4].expand(2, 3, 5), rtol=0, atol=1e-6)
    bf16 = posterior_mean_embedding(torch.zeros(1, 7, dtype=torch.bfloat16), table.bfloat16())
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16[0], table.bfloat16().float().mean(0), rtol=0, atol=1e-6)


def test_velocity_mse_is_the_weighted_embedding_mse():
    generator = torch.Generator().manual_seed(1)
    x0_hat, e, z = (torch.randn(3, 4, 6, generator=generator, dtype=F64) for _ in range(3))
    t = torch.tensor([0.1, 0.5, 0.97], dtype=F64)
    v_hat, v_star = velocity(x0_hat, z, t), velocity(e, z, t)
    torch.testing.assert_close(v_hat[1], (x0_hat[1] - z[1]) / 0.5)
    velocity_sq = (v_hat - v_star).square().sum(-1)
    weighted = velocity_mse_weight(t).view(-1, 1) * (x0_hat - e).square().sum(-1)
    torch.testing.assert_close(velocity_sq, weighted, rtol=1e-12, atol=0)


def test_embedding_mse_is_per_position_and_reduced_like_the_ce():
    x0_hat = torch.zeros(2, 2, 2, dtype=F64)
    e = torch.tensor([[[1.0, 1.0], [2.0, 0.0]], [[0.0, 3.0], [5.0, 5.0]]], dtype=F64)
    corrupted = torch.tensor([[True, True], [True, False]])
    mse = embedding_mse(x0_hat, e)
    assert mse.tolist() == [[1.0, 2.0], [4.5, 25.0]]
    valid = torch.ones_like(corrupted)
    p = torch.ones(2, dtype=F64)
    assert float(masked_loss(mse, corrupted, p, valid, "inverse_count")) == pytest.approx(((1.0 + 2.0) / 2 + 4.5) / 2)


def test_per_position_ce_and_token_diagnostics_by_hand():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], [[0.5, 0.25, 0.25], [1 / 3] * 3]]))
    targets = torch.tensor([[0, 0], [1, 2]])
    ce = per_position_ce(logits, targets)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, -torch.log(torch.tensor([[0.7, 0.1], [0.25, 1 / 3]])))
    corrupted = torch.tensor([[True, True], [True, False]])
    stats = token_diagnostics(logits, targets, corrupted)
    entropy = [-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)),
               -(0.2 * math.log(0.1) + 0.8 * math.log(0.8))]
    torch.testing.assert_close(stats["ce"], torch.tensor([-(math.log(0.7) + math.log(0.1)) / 2, -math.log(0.25)]))
    torch.testing.assert_close(stats["accuracy"], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(stats["confidence"], torch.tensor([0.75, 0.5]))
    torch.testing.assert_close(stats["entropy"], torch.tensor([sum(entropy) / 2, 1.5 * math.log(2)]))
    precomputed = token_diagnostics(logits, targets, corrupted, ce=torch.ones(2, 2))
    torch.testing.assert_close(precomputed["ce"], torch.ones(2))
    assert bool(token_diagnostics(logits, targets, torch.zeros_like(corrupted))["ce"].isnan().all())
