"""Gumbel-max sampling, top-p, banned ids and the confidence scores."""
import math

import pytest
import torch

from mlfm_scale.sample.tokens import confidence, gumbel_max, sample_and_score, tempered_log_probs

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def test_gumbel_max_draws_from_the_distribution():
    log_probs = PROBS.log().expand(20000, -1)
    draws = gumbel_max(log_probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, PROBS, atol=0.015, rtol=0)


def test_temperature_top_p_and_banned_ids():
    logits = PROBS.log()
    cold = tempered_log_probs(logits, 0.5).exp()
    torch.testing.assert_close(cold, PROBS**2 / (PROBS**2).sum())
    nucleus = tempered_log_probs(logits, 1.0, top_p=0.7).exp()  # 0.5 + 0.3 reach 0.7: two tokens stay
    torch.testing.assert_close(nucleus, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert tempered_log_probs(logits, 1.0, top_p=0.01).exp().tolist() == [1.0, 0.0, 0.0, 0.0]
    banned = tempered_log_probs(logits, 1.0, banned=torch.tensor([0])).exp()
    torch.testing.assert_close(banned, torch.tensor([0.0, 0.6, 0.3, 0.1]))
    draws = gumbel_max(tempered_log_probs(logits.expand(500, -1), 1.0, top_p=0.7), torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {0, 1}


def test_confidence_scores():
    log_probs, token = PROBS.log()[None], torch.tensor([1])
    assert math.isclose(float(confidence(log_probs, token, "prob")), 0.3, rel_tol=1e-6)
    assert math.isclose(float(confidence(log_probs, token, "max_prob")), 0.5, rel_tol=1e-6)
    assert math.isclose(float(confidence(log_probs, token, "margin")), 0.2, rel_tol=1e-5)
    entropy = -float((PROBS * PROBS.log()).sum())
    assert math.isclose(float(confidence(log_probs, token, "neg_entropy")), -entropy, rel_tol=1e-6)


def test_untempered_confidence_is_the_models_own_probability():
    logits = PROBS.log().expand(4000, -1)
    tokens, score = sample_and_score(logits, 0.1, 1.0, torch.tensor([3]), "prob", torch.Generator().manual_seed(0),
                                     "untempered")
    assert (tokens == 0).float().mean() > 0.95  # p^10: the top token almost always
    torch.testing.assert_close(score[tokens == 0], torch.full_like(score[tokens == 0], 0.5 / 0.95))


def test_tempered_confidence_is_the_probability_under_the_distribution_drawn_from():
    logits, banned = PROBS.log().expand(4000, -1), torch.tensor([3])
    tokens, score = sample_and_score(logits, 0.1, 1.0, banned, "prob", torch.Generator().manual_seed(0))
    cold = PROBS[:3] ** 10 / (PROBS[:3] ** 10).sum()  # softmax(log p / 0.1) without the banned id
    torch.testing.assert_close(score, cold[tokens])
    assert float(cold[0]) > 0.99 and float(cold[1]) < 0.01  # so the default score differs from 0.5 / 0.95
    # at temperature 1 within the nucleus {0, 1} (mass 0.8 ≥ top_p): p renormalised over the nucleus
    tokens, score = sample_and_score(logits, 1.0, 0.7, None, "max_prob", torch.Generator().manual_seed(1))
    assert set(tokens.tolist()) == {0, 1}
    torch.testing.assert_close(score, torch.full_like(score, 0.625))
    with pytest.raises(ValueError, match="tempered, untempered"):
        sample_and_score(logits, 1.0, 1.0, None, "prob", torch.Generator(), "cold")
