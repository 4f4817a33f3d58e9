"""Classifier-free guidance: the unconditional input (corrupt, mask, drop), rows without a prompt, the two
targets."""
import pytest
import torch

from mlfm_scale.config import SampleSection
from mlfm_scale.flow.objective import posterior_mean_embedding
from mlfm_scale.model.common import segment_starts_and_positions
from mlfm_scale.sample.guidance import (
    guidance_passes,
    guided_logits,
    guided_posterior_mean,
    unconditional_input,
    unconditional_logits,
)
from tests.mlfm_scale.sample.toy import PAD, D, ToyDenoiser

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
    passes = guidance_passes(model, z, gamma, t, e, model.mask_embedding(), PROMPT, None, cfg,
                             torch.Generator().manual_seed(2))
    x0 = guided_posterior_mean(*passes, z, t, model.table, cfg)
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
    logits_c, logits_u = guidance_passes(model, z, torch.zeros(B), t, e, model.mask_embedding(), PROMPT, None,
                                         SampleSection(), torch.Generator())
    x0 = guided_posterior_mean(logits_c, logits_u, z, t, model.table, SampleSection())
    assert model.row_evaluations == B and logits_u is None
    torch.testing.assert_close(x0, posterior_mean_embedding(model(z, torch.zeros(B)), model.table))


SEGMENTS = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]])  # row 1 ends in two padding positions
KEPT = [[2, 3, 4, 5], [1, 2, 3]]  # what drop mode keeps: neither prompt nor padding


def test_drop_mode_packs_each_row_without_its_prompt_from_position_zero():
    model, e, z, t = setup()
    gamma = torch.full((B,), -1.0)
    logits_c = model(z, gamma, SEGMENTS)
    logits_u = unconditional_logits(model, z, gamma, t, e, model.mask_embedding(), PROMPT, SEGMENTS, logits_c,
                                    "drop", None)
    packed, segments = model.inputs[-1], model.segments[-1]
    assert packed.shape == (B, 4, D) and segments.tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]
    assert torch.equal(packed[0], z[0, KEPT[0]]) and torch.equal(packed[1, :3], z[1, KEPT[1]])
    assert torch.equal(packed[1, 3], model.table[PAD]) and torch.equal(model.gammas[-1], gamma)
    assert segment_starts_and_positions(segments)[1].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    # prompt and padding positions keep the conditional logits
    assert torch.equal(logits_u[PROMPT], logits_c[PROMPT]) and torch.equal(logits_u[1, 4:], logits_c[1, 4:])


def transformer():
    """A small random plain-PyTorch MLFM (RoPE attention within segments) over a 16-token vocabulary."""
    from mlfm_scale.inference.model import MLFMForInference

    torch.manual_seed(0)
    model = {"num_layers": 1, "hidden_size": 32, "num_heads": 4, "ffn_hidden_size": 64, "time_embed_dim": 16,
             "time_hidden_size": 24}
    return MLFMForInference({"architecture": "MLFM", "model": model, "objective": {}, "vocab_size": 16,
                             "seq_len": 16, "sigma": 0.2, "mask_id": 15, "eos_id": 13, "pad_id": 14}).eval()


@pytest.mark.parametrize("network", ["toy", "transformer"])
@torch.no_grad()
def test_drop_mode_is_the_network_on_the_row_without_its_prompt(network):
    model = ToyDenoiser() if network == "toy" else transformer()
    e = model.embed(torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]))
    noise = torch.randn(e.shape, generator=torch.Generator().manual_seed(0))
    z, gamma, t = torch.where(PROMPT.unsqueeze(-1), e, noise), torch.full((B,), -1.0), torch.tensor(0.3)
    logits_c = model(z, gamma, SEGMENTS)
    logits_u = unconditional_logits(model, z, gamma, t, e, model.mask_embedding(), PROMPT, SEGMENTS, logits_c,
                                    "drop", None)
    for row, kept in enumerate(KEPT):
        alone = model(z[row, kept].unsqueeze(0), gamma[:1])
        torch.testing.assert_close(logits_u[row, kept], alone[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits_u[row, kept], logits_c[row, kept], atol=1e-3)


@pytest.mark.parametrize("mode", ["corrupt", "mask", "drop"])
def test_rows_without_a_prompt_get_no_unconditional_pass(mode):
    model, e, z, t = setup()
    prompt = PROMPT & torch.tensor([[True], [False]])
    gamma, m = torch.full((B,), -1.0), model.mask_embedding()
    logits_c = model(z, gamma)
    logits_u = unconditional_logits(model, z, gamma, t, e, m, prompt, None, logits_c, mode,
                                    torch.Generator().manual_seed(3))
    assert model.row_evaluations == B + 1 and model.inputs[-1].size(0) == 1  # row 0 only
    assert torch.equal(logits_u[1], logits_c[1]) and not torch.allclose(logits_u[0], logits_c[0], atol=1e-3)
    for target in ("velocity", "logits"):  # so guidance leaves row 1 as the conditional pass has it
        cfg = SampleSection(guidance_scale=1.5, guidance_target=target)
        x0 = guided_posterior_mean(logits_c, logits_u, z, t, model.table, cfg)
        torch.testing.assert_close(x0[1], posterior_mean_embedding(logits_c[1], model.table))
        torch.testing.assert_close(guided_logits(logits_c, logits_u, cfg)[1].softmax(-1), logits_c[1].softmax(-1))
    nothing = unconditional_logits(model, z, gamma, t, e, m, torch.zeros_like(PROMPT), None, logits_c, mode, None)
    assert model.row_evaluations == B + 1 and nothing is logits_c
