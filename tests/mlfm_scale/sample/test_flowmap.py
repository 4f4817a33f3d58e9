"""The flow-map sampler (method=flowmap) on in-test flow-map denoisers: NFE, the grid's jumps, observed positions,
the composition of jumps, promotion off, refusals, seeds, the quantile confidence."""
import pytest
import torch

from mlfm_scale.config import SampleSection
from mlfm_scale.errors import UserError
from mlfm_scale.flow.flowmap import flow_map
from mlfm_scale.flow.schedules import bridge_time
from mlfm_scale.sample import generate
from mlfm_scale.sample.canvas import build_canvas
from mlfm_scale.sample.flowmap import flowmap_trajectory
from mlfm_scale.sample.grid import gamma_grid
from tests.mlfm_scale.sample.toy import MASK, PAD, SEQ, ToyDenoiser, ToyFlowMap, V

PROMPTS = [[1, 2, 3], [], [4, 5, 6, 7, 8, 9, 10]]
K = 3
GRID = gamma_grid(ToyDenoiser().gamma_schedule(), K, -6.0, 6.0)


def options(**kw):
    return SampleSection(**({"method": "flowmap", "steps": K, "length": 6, "temperature": 1.0, "gamma_min": -6.0,
                             "stop_at_eos": False} | kw))


@pytest.mark.parametrize("guidance,prompted", [(0.0, K), (2.0, 2 * K)])
def test_nfe_is_k_jumps_per_round_and_k_more_on_prompted_rows_with_guidance(guidance, prompted):
    model = ToyFlowMap()
    out = generate(model, PROMPTS, options(threshold=0.9, guidance_scale=guidance, guidance_target="logits"))
    assert (out.rounds > 1).all()  # untempered confidence below 0.9: a token per round
    assert (out.nfe == out.rounds * torch.tensor([prompted, K, prompted])).all()  # row 1 has nothing to hide
    assert int(out.nfe.sum()) == model.row_evaluations


def test_without_promotion_one_round_of_k_jumps_decodes_every_token():
    model = ToyFlowMap()
    out = generate(model, PROMPTS, options(promotion=False, threshold=2.0))
    assert out.rounds.tolist() == [1, 1, 1] and out.nfe.tolist() == [K] * 3 and model.row_evaluations == 3 * K
    assert [len(g) for g in out.generated] == [6, 6, 6] and MASK not in sum(out.generated, [])


def test_promotion_off_makes_the_mlfm_sampler_the_flow_sampler():
    off = generate(ToyDenoiser(), PROMPTS, options(method="mlfm", promotion=False, threshold=0.99))
    flow = generate(ToyDenoiser(), PROMPTS, options(method="flow"))
    assert torch.equal(off.ids, flow.ids) and torch.equal(off.nfe, flow.nfe) and off.rounds.tolist() == [1, 1, 1]


@pytest.mark.parametrize("mode", ["mask", "drop"])
def test_every_evaluation_jumps_between_consecutive_grid_points(mode):
    """Conditional and unconditional passes alike see (γ_k, γ_{k+1}); each round walks the grid k = 0 … K − 1."""
    model = ToyFlowMap()
    out = generate(model, PROMPTS, options(threshold=0.9, guidance_scale=1.5, guidance_target="logits",
                                           guidance_mode=mode))
    grid = GRID.float()
    jumps = []
    for gamma, target in zip(model.gammas, model.targets):
        k = int((grid == gamma[0]).nonzero())
        assert torch.equal(gamma, grid[k].expand_as(gamma)) and torch.equal(target, grid[k + 1].expand_as(gamma))
        if not jumps or jumps[-1] != k:  # an unconditional pass repeats its conditional pass' jump
            jumps.append(k)
    assert len(model.gammas) > len(jumps) and jumps == list(range(K)) * int(out.rounds.max())


def test_observed_positions_enter_every_jump_as_their_clean_embeddings():
    model = ToyFlowMap()
    out = generate(model, [[1, 2, 3]], options(threshold=0.95, length=8), history=True)
    rounds = out.history[0]
    assert len(rounds) > 1 and len(model.inputs) == int(out.nfe[0]) == K * len(rounds)
    observed = [0, 1, 2]
    for r, promoted in enumerate(rounds):
        for z in model.inputs[K * r: K * (r + 1)]:
            assert torch.equal(z[0, observed], model.table[out.ids[0, observed]])
        observed += promoted["positions"]


def test_jumps_with_one_sharp_estimate_compose_to_one_jump():
    """With D fixed (one-hot logits) the flow map is exact, so K jumps land where one jump t_0 → t_K does."""
    target = torch.randint(0, V - 3, (SEQ,), generator=torch.Generator().manual_seed(3))
    model = ToyFlowMap(fixed=target)
    canvas = build_canvas([[1, 2, 3], []], 5, SEQ, MASK, PAD)  # row 1 is padded
    grid = gamma_grid(model.gamma_schedule(), 4, -6.0, 6.0)
    flowmap_trajectory(model, canvas.ids, canvas.fill, canvas.prompt, canvas.segment_ids, grid, options(steps=4),
                       torch.Generator().manual_seed(0))
    t, e, m = bridge_time(grid, model.sigma), model.embed(canvas.ids), model.mask_embedding()
    d = model.table[target[:8]].expand(2, -1, -1)
    hold = canvas.fill.unsqueeze(-1)
    assert len(model.inputs) == 4  # z_0 … z_3: the state after the last jump is not computed
    for k, seen in enumerate(model.inputs[1:], start=1):
        torch.testing.assert_close(seen, torch.where(hold, flow_map(model.inputs[0], d, m, t[0], t[k]), e),
                                   rtol=1e-5, atol=1e-5)


def test_refuses_a_model_without_a_flow_map_and_velocity_guidance():
    with pytest.raises(UserError, match="mlfm distill"):
        generate(ToyDenoiser(), PROMPTS, options())
    with pytest.raises(UserError, match="guidance_target=logits"):
        generate(ToyFlowMap(), PROMPTS, options(guidance_scale=1.0, guidance_target="velocity"))
    out = generate(ToyFlowMap(), PROMPTS, options(guidance_target="velocity"))  # unguided: no velocity to guide
    assert [len(g) for g in out.generated] == [6, 6, 6]


def test_same_seed_same_samples_other_seed_other_samples():
    a = generate(ToyFlowMap(), PROMPTS, options(seed=7, length=10, threshold=0.9))
    b = generate(ToyFlowMap(), PROMPTS, options(seed=7, length=10, threshold=0.9))
    c = generate(ToyFlowMap(), PROMPTS, options(seed=8, length=10, threshold=0.9))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.nfe, b.nfe)
    assert not torch.equal(a.ids, c.ids)


class SureAtOneJump(ToyFlowMap):
    """Certain of token 5 when jumping from γ = ``level`` (logit 50), elsewhere leaning to token 6 (logit 2)."""

    def __init__(self, level: float):
        super().__init__()
        self.level = level

    def forward(self, z, gamma, segment_ids=None, gamma_target=None):
        super().forward(z, gamma, segment_ids, gamma_target)  # counts and records the call
        sure = ((gamma - self.level).abs() < 1e-4)[:, None, None]
        one_hot = torch.nn.functional.one_hot(torch.tensor([5, 6]), V).float()
        return torch.where(sure, 50.0 * one_hot[0], 2.0 * one_hot[1]).expand(-1, z.size(1), -1)


@pytest.mark.parametrize("source,rounds", [("final", 6), ("quantile", 1)])
def test_quantile_confidence_scores_the_last_jumps_tokens_by_an_earlier_jumps_draw(source, rounds):
    grid = gamma_grid(ToyDenoiser().gamma_schedule(), 4, -6.0, 6.0)
    model = SureAtOneJump(float(grid[2]))  # 4 jumps, quantile 0.5: jump 2
    out = generate(model, [[1, 2]], options(steps=4, temperature=0.1, threshold=0.8, confidence_source=source,
                                            confidence_quantile=0.5))
    assert out.generated == [[6] * 6] and int(out.rounds[0]) == rounds
