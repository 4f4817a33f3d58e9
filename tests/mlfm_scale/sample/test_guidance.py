"""Classifier-free guidance: the unconditional input and the two targets."""
import pytest
import torch

from mlfm_scale.config import SampleSection
from mlfm_scale.flow.objective import posterior_mean_embedding
from mlfm_scale.sample.guidance import guided_posterior_mean, unconditional_input
from tests.mlfm_scale.sample.toy import D, ToyDenoiser

B, S = 2, 6
PROMPT = torch.tensor([[True, True, False, False, False, False], [True, False, False, False, False, False]])


def setup():
    model = ToyDenoiser()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    e = model.embed(ids)
    z = torch.where(PROMPT.unsqueeze(-1), e, torch.randn(B, S, D, generator=torch.Generator().manual_seed(0)))
    return model, e, z, torch.tensor(0.3, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["corrupt", "mask"])
def test_unconditional_input_hides_only_the_prompt(mode):
    model, e, z, t = setup()
    z_u = unconditional_input(z, e, model.mask_embedding(), PROMPT, t, mode, 0.2, torch.Generator().manual_seed(1))
    assert torch.equal(z_u[~PROMPT], z[~PROMPT]) and not torch.isclose(z_u[PROMPT], e[PROMPT]).all(dim=-1).any()
    if mode == "mask":
        assert torch.equal(z_u[PROMPT], model.mask_embedding().expand(3, -1))
    else:  # the forward process at t: mean (1−t)m + t·e, spread σ·sqrt(t(1−t)) ≈ 0.09
        mean = 0.7 * model.mask_embedding() + 0.3 * e[PROMPT]
        assert (z_u[PROMPT] - mean).abs().max() < 0.5


@pytest.mark.parametrize("target", ["velocity", "logits"])
def test_guided_posterior_mean_matches_its_formula(target):
    model, e, z, t = setup()
    cfg = SampleSection(guidance_scale=1.5, guidance_mode="mask", guidance_target=target)
    gamma = torch.full((B,), -1.0)
    x0 = guided_posterior_mean(model, z, gamma, t, e, model.mask_embedding(), model.table, PROMPT, None, cfg,
                               torch.Generator().manual_seed(2))
    assert model.row_evaluations == 2 * B
    logits_c = model(z, gamma)
    logits_u = model(unconditional_input(z, e, model.mask_embedding(), PROMPT, t, "mask", 0.2, None), gamma)
    if target == "velocity":  # v = v_c + s(v_c − v_u) and x̂0 = z + (1−t)v  ⇔  x̂0 = x̂0_c + s(x̂0_c − x̂0_u)
        c, u = posterior_mean_embedding(logits_c, model.table), posterior_mean_embedding(logits_u, model.table)
        expected = c + 1.5 * (c - u)
    else:
        c, u = logits_c.log_softmax(-1), logits_u.log_softmax(-1)
        expected = posterior_mean_embedding(c + 1.5 * (c - u), model.table)
    torch.testing.assert_close(x0, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(x0, posterior_mean_embedding(logits_c, model.table), atol=1e-3)


def test_no_guidance_is_one_conditional_pass():
    model, e, z, t = setup()
    x0 = guided_posterior_mean(model, z, torch.zeros(B), t, e, model.mask_embedding(), model.table, PROMPT, None,
                               SampleSection(), torch.Generator())
    assert model.row_evaluations == B
    torch.testing.assert_close(x0, posterior_mean_embedding(model(z, torch.zeros(B)), model.table))
