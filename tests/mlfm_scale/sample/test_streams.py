"""Per-prompt random streams (``generate(..., seeds=...)``): a prompt's sample is the same alone, in a batch of 4
or in a shuffled batch of 8, for every method; seeds and a generator together are refused."""
import pytest
import torch

from mlfm_scale.config import SampleSection
from mlfm_scale.errors import UserError
from mlfm_scale.sample import generate
from mlfm_scale.seeds import prompt_seed
from tests.mlfm_scale.sample.toy import ToyDenoiser, ToyFlowMap

PROMPTS = [[1, 2, 3], [], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13], [14, 15, 16, 17], [18, 19, 20, 21, 22], [23]]
SEEDS = [prompt_seed(7, i) for i in range(len(PROMPTS))]
ORDER = [5, 2, 7, 0, 3, 6, 1, 4]
ROW = 10  # the toy's seq_len lowered, so rows that fill the rest of it stay quick to sample

CASES = {
    "mlfm": ({}, ToyDenoiser),
    "mlfm_corrupt": ({"guidance_scale": 1.5}, ToyDenoiser),
    "mlfm_mask_logits": ({"guidance_scale": 1.5, "guidance_mode": "mask", "guidance_target": "logits"},
                         ToyDenoiser),
    "mlfm_drop_quantile": ({"guidance_scale": 1.5, "guidance_mode": "drop", "confidence_source": "quantile"},
                           ToyDenoiser),
    "flow": ({"method": "flow"}, ToyDenoiser),
    "mdm": ({"method": "mdm", "steps": 5}, ToyDenoiser),
    "flowmap": ({"method": "flowmap", "guidance_scale": 1.5, "guidance_target": "logits"}, ToyFlowMap),
}


def options(**kw):
    return SampleSection(**({"steps": 2, "temperature": 1.0, "threshold": 0.9, "gamma_min": -6.0} | kw))


def sampled(model, cfg, index):
    """{prompt index: (generated, nfe, rounds)} of the prompts ``index`` sampled as one batch."""
    out = generate(model, [PROMPTS[i] for i in index], cfg, seeds=[SEEDS[i] for i in index])
    return {i: (g, int(n), int(r)) for i, g, n, r in zip(index, out.generated, out.nfe, out.rounds)}


@pytest.mark.parametrize("length", [None, 3], ids=["fixed_width_rows", "fixed_fill"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_prompt_samples_the_same_alone_and_in_any_batch(case, length):
    """None: every row fills the rest of the model's seq_len (one width, the evaluation protocol's layout; the
    rows fill different counts, so they leave the batch at different rounds); 3: rows of different widths,
    whose draws cover only their own positions, so the padding changes nothing either."""
    kw, model_class = CASES[case]
    cfg, model = options(length=length, **kw), model_class()
    model.seq_len = ROW
    alone = {}
    for i in range(len(PROMPTS)):
        alone |= sampled(model, cfg, [i])
    assert sampled(model, cfg, [0, 1, 2, 3]) == {i: alone[i] for i in range(4)}
    assert sampled(model, cfg, ORDER) == alone


def test_seeds_pick_the_streams():
    cfg = options(length=6)
    a = generate(ToyDenoiser(), [[1, 2]] * 2, cfg, seeds=[SEEDS[0], SEEDS[0]])
    b = generate(ToyDenoiser(), [[1, 2]] * 2, cfg, seeds=[SEEDS[0], SEEDS[1]])
    assert a.generated[0] == a.generated[1] == b.generated[0] != b.generated[1]


def test_prompt_seed_is_a_fixed_63_bit_function_of_seed_and_index():
    assert prompt_seed(7, 0) == 7127318741406446  # blake2b of "7:0": fixed across runs and machines
    assert len({prompt_seed(s, i) for s in range(3) for i in range(50)}) == 150
    assert all(0 <= prompt_seed(s, i) < 2 ** 63 for s in (0, -1, 2 ** 40) for i in (0, 10 ** 6))


def test_seeds_and_a_generator_together_or_a_seed_count_mismatch_are_refused():
    with pytest.raises(UserError, match="not both"):
        generate(ToyDenoiser(), PROMPTS[:2], options(), torch.Generator(), seeds=SEEDS[:2])
    with pytest.raises(UserError, match="one seed per prompt"):
        generate(ToyDenoiser(), PROMPTS[:2], options(), seeds=SEEDS[:3])
