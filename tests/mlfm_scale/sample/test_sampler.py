"""The sampler end to end on in-test denoisers: what it fills, one-hot logits, NFE, seeds, batches, EOS, the
quantile confidence."""
import math

import pytest
import torch

from mlfm_scale.config import SampleSection
from mlfm_scale.errors import UserError
from mlfm_scale.sample import generate
from mlfm_scale.sample.grid import gamma_grid
from tests.mlfm_scale.sample.toy import EOS, MASK, PAD, SEQ, ToyDenoiser, V

PROMPTS = [[1, 2, 3], [], [4, 5, 6, 7, 8, 9, 10]]


def options(**kw):
    return SampleSection(**({"steps": 4, "length": 6, "temperature": 1.0, "stop_at_eos": False} | kw))


@pytest.mark.parametrize("method", ["mlfm", "flow", "mdm"])
@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_fills_exactly_the_masked_positions_and_keeps_the_prompt(method, guidance):
    out = generate(ToyDenoiser(), PROMPTS, options(method=method, guidance_scale=guidance))
    for row, prompt in zip(out.ids, PROMPTS):
        n = len(prompt)
        assert row[:n].tolist() == prompt
        assert len(row) == 7 + 6 and all(0 <= t < V and t != MASK for t in row[n:n + 6].tolist())
        assert (row[n + 6:] == PAD).all()
    assert [len(g) for g in out.generated] == [6, 6, 6]
    assert [g == r[len(p):len(p) + 6].tolist() for g, r, p in zip(out.generated, out.ids, PROMPTS)] == [True] * 3


def test_fixed_one_hot_logits_are_returned_in_one_promotion_round():
    target = torch.randint(0, V - 3, (SEQ,), generator=torch.Generator().manual_seed(3))
    out = generate(ToyDenoiser(fixed=target), PROMPTS, options(temperature=0.1, steps=8))
    for row, prompt in zip(out.generated, PROMPTS):
        assert row == target[len(prompt):len(prompt) + 6].tolist()
    assert out.rounds.tolist() == [1, 1, 1] and out.nfe.tolist() == [9, 9, 9]


@pytest.mark.parametrize("guidance,target,prompted", [(0.0, "velocity", 5 + 1), (2.0, "velocity", 2 * 5 + 1),
                                                      (2.0, "logits", 2 * 5 + 2)])
def test_nfe_equals_the_formula_and_the_evaluations_made(guidance, target, prompted):
    """Guidance costs a row with a prompt an unconditional pass per step (and one more for the final forward
    with the logits target); the unprompted row 1 has nothing to hide and gets none."""
    model = ToyDenoiser()
    out = generate(model, PROMPTS, options(steps=5, threshold=0.9, guidance_scale=guidance, guidance_target=target))
    per_round = torch.tensor([prompted, 5 + 1, prompted])
    assert (out.nfe == out.rounds * per_round).all() and (out.rounds >= 1).all() and (out.rounds <= 6).all()
    assert int(out.nfe.sum()) == model.row_evaluations
    flow = generate(model, PROMPTS, options(method="flow", steps=5, guidance_scale=guidance, guidance_target=target))
    assert flow.rounds.tolist() == [1, 1, 1] and flow.nfe.tolist() == per_round.tolist()
    assert int(flow.nfe.sum()) == model.row_evaluations - int(out.nfe.sum())


def test_mdm_reveals_everything_within_its_steps_at_one_evaluation_per_row_and_step():
    model = ToyDenoiser()
    out = generate(model, PROMPTS, options(method="mdm", steps=3))
    assert (out.nfe <= 3).all() and (out.nfe == out.rounds).all() and int(out.nfe.sum()) == model.row_evaluations
    many = generate(ToyDenoiser(), PROMPTS, options(method="mdm", steps=256))
    assert (many.nfe <= 6).all()  # steps revealing nothing cost nothing
    one = generate(ToyDenoiser(), PROMPTS, options(method="mdm", steps=1))
    assert one.nfe.tolist() == [1, 1, 1]


@pytest.mark.parametrize("method", ["mlfm", "mdm"])
def test_same_seed_same_samples_other_seed_other_samples(method):
    a = generate(ToyDenoiser(), PROMPTS, options(method=method, seed=7, length=10))
    b = generate(ToyDenoiser(), PROMPTS, options(method=method, seed=7, length=10))
    c = generate(ToyDenoiser(), PROMPTS, options(method=method, seed=8, length=10))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.nfe, b.nfe)
    assert not torch.equal(a.ids, c.ids)


def test_padding_is_its_own_segment_and_never_leaks_into_the_model_input():
    model = ToyDenoiser()
    generate(model, PROMPTS, options(steps=2))
    pad_embedding = model.table[PAD]
    assert all(torch.equal(z[1, 6:], pad_embedding.expand(7, -1)) for z in model.inputs if z.size(0) == 3)


def test_eos_stops_a_sample_and_fills_the_rest_with_eos():
    target = torch.full((SEQ,), 5)
    target[4] = EOS
    model = ToyDenoiser(fixed=target)
    out = generate(model, [[1, 2]], options(temperature=0.1, length=8, stop_at_eos=True))
    assert out.generated == [[5, 5]] and out.ids[0, 4:10].tolist() == [EOS] * 6
    kept = generate(model, [[1, 2]], options(temperature=0.1, length=8, stop_at_eos=False))
    assert kept.generated == [[5, 5, EOS, 5, 5, 5, 5, 5]]


def test_history_records_every_promotion_once():
    out = generate(ToyDenoiser(), PROMPTS, options(threshold=0.95, length=8), history=True)
    for rows, prompt, rounds in zip(out.history, PROMPTS, out.rounds.tolist()):
        positions = sorted(p for r in rows for p in r["positions"])
        assert positions == list(range(len(prompt), len(prompt) + 8)) and len(rows) == rounds
        assert [r["round"] for r in rows] == list(range(1, rounds + 1))


def test_bad_requests_are_user_errors():
    with pytest.raises(UserError, match="seq_len 32"):
        generate(ToyDenoiser(), [list(range(30))], options(length=6))
    with pytest.raises(UserError, match="mask token"):
        generate(ToyDenoiser(), [[1, MASK]], options())
    with pytest.raises(UserError, match="at least one"):
        generate(ToyDenoiser(), [], options())



def test_observed_positions_enter_every_evaluation_as_their_clean_embeddings():
    model = ToyDenoiser()
    out = generate(model, [[1, 2, 3]], options(steps=3, threshold=0.95, length=8), history=True)
    rounds = out.history[0]
    assert len(rounds) > 1 and len(model.inputs) == int(out.nfe[0]) == 4 * len(rounds)
    observed = [0, 1, 2]
    for r, promoted in enumerate(rounds):
        for z in model.inputs[4 * r: 4 * (r + 1)]:
            assert torch.equal(z[0, observed], model.table[out.ids[0, observed]])
            assert not torch.isclose(z[0, promoted["positions"]], model.table[MASK]).all(dim=-1).any()
        observed += promoted["positions"]


class SureAtOneStep(ToyDenoiser):
    """Certain of token 5 at γ = ``level`` (logit 50), elsewhere leaning to token 6 (logit 2: probability 0.17)."""

    def __init__(self, level: float):
        super().__init__()
        self.level = level

    def forward(self, z, gamma, segment_ids=None):
        super().forward(z, gamma, segment_ids)  # counts and records the call
        sure = ((gamma - self.level).abs() < 1e-4)[:, None, None]
        return torch.where(sure, 50.0 * one_hot(5), 2.0 * one_hot(6)).expand(-1, z.size(1), -1)


def one_hot(token: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(token), V).float()


@pytest.mark.parametrize("source,quantile,rounds", [("final", 0.5, 6), ("quantile", 0.5, 1), ("quantile", 0.25, 6)])
def test_quantile_confidence_scores_the_final_tokens_by_a_mid_trajectory_draw(source, quantile, rounds):
    """Steps: 4, so quantile 0.5 draws the confidence at step 2, where the model is sure (of another token)."""
    grid = gamma_grid(ToyDenoiser().gamma_schedule(), 4, -6.0, 6.0)
    model = SureAtOneStep(float(grid[2]))
    out = generate(model, [[1, 2]], options(steps=4, gamma_min=-6.0, temperature=0.1, threshold=0.8,
                                            confidence_temperature="untempered", confidence_source=source,
                                            confidence_quantile=quantile), history=True)
    assert out.generated == [[6] * 6]  # the tokens come from the final logits
    assert int(out.rounds[0]) == rounds  # a confident mid draw promotes all at once; 0.17 one per round
    leaning = math.exp(2) / (math.exp(2) + V - 3)  # token 6's probability without the mask and pad ids
    scores = [s for r in out.history[0] for s in r["scores"]]
    assert scores == pytest.approx([1.0 if rounds == 1 else leaning] * 6, rel=1e-4)
