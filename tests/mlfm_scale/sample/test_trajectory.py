"""One SDE trajectory: the logits it ends with (guided with the logits target), the kept step, its NFE."""
import pytest
import torch

from mlfm_scale.config import SampleSection
from mlfm_scale.sample.canvas import build_canvas
from mlfm_scale.sample.grid import gamma_grid
from mlfm_scale.sample.trajectory import confidence_step, sde_trajectory, trajectory_nfe
from tests.mlfm_scale.sample.toy import MASK, PAD, SEQ, ToyDenoiser

STEPS = 3
GRID = gamma_grid(ToyDenoiser().gamma_schedule(), STEPS, -6.0, 6.0)


def trajectory(target: str, scale: float = 1.5, keep_step: int | None = None):
    """A trajectory over a prompted and an unprompted row (mask-mode guidance): (model, final logits, kept, cfg,
    canvas)."""
    model = ToyDenoiser()
    canvas = build_canvas([[1, 2, 3], []], 4, SEQ, MASK, PAD)
    cfg = SampleSection(steps=STEPS, guidance_scale=scale, guidance_mode="mask", guidance_target=target)
    logits, kept = sde_trajectory(model, canvas.ids, canvas.fill, canvas.prompt, canvas.segment_ids, GRID, cfg,
                                  torch.Generator().manual_seed(0), keep_step)
    return model, logits, kept, cfg, canvas


def rerun(model: ToyDenoiser, call: int) -> torch.Tensor:
    """The logits of the model's ``call``-th evaluation, recomputed (by an unrecorded twin) from its inputs."""
    return ToyDenoiser()(model.inputs[call], model.gammas[call], model.segments[call])


def test_the_logits_target_guides_the_final_forward():
    model, logits, _, cfg, canvas = trajectory("logits")
    conditional, unconditional = rerun(model, -2), rerun(model, -1)
    assert model.inputs[-1].size(0) == 1  # the final unconditional pass: the prompted row only
    torch.testing.assert_close(model.inputs[-1][0, :3], model.mask_embedding().expand(3, -1))
    log_c, log_u = conditional.log_softmax(-1), unconditional.log_softmax(-1)
    torch.testing.assert_close(logits[0], log_c[0] + 1.5 * (log_c[0] - log_u[0]))
    torch.testing.assert_close(logits[1], log_c[1])  # no prompt: nothing to guide by
    assert not torch.allclose(logits[0].softmax(-1), conditional[0].softmax(-1), atol=1e-3)
    nfe = trajectory_nfe(STEPS, cfg, canvas.prompt.any(dim=1))
    assert nfe.tolist() == [2 * STEPS + 2, STEPS + 1] and model.row_evaluations == int(nfe.sum())


def test_the_velocity_target_leaves_the_final_forward_conditional():
    model, logits, _, cfg, canvas = trajectory("velocity")
    assert model.inputs[-1].size(0) == 2  # the final forward: one conditional pass over both rows
    torch.testing.assert_close(logits, rerun(model, -1))
    nfe = trajectory_nfe(STEPS, cfg, canvas.prompt.any(dim=1))
    assert nfe.tolist() == [2 * STEPS + 1, STEPS + 1] and model.row_evaluations == int(nfe.sum())
    unguided = trajectory("velocity", scale=0.0)[3]
    assert trajectory_nfe(STEPS, unguided, canvas.prompt.any(dim=1)).tolist() == [STEPS + 1, STEPS + 1]


@pytest.mark.parametrize("target", ["velocity", "logits"])
def test_the_kept_step_returns_the_logits_that_step_drew_on(target):
    model, _, kept, _, _ = trajectory(target, keep_step=1)
    # each step: the conditional pass over both rows, then the unconditional one over the prompted row
    conditional, unconditional = rerun(model, 2), rerun(model, 3)
    assert model.gammas[2].tolist() == [pytest.approx(float(GRID[1]))] * 2  # step 1's γ
    if target == "velocity":
        torch.testing.assert_close(kept, conditional)
    else:
        log_c, log_u = conditional.log_softmax(-1), unconditional.log_softmax(-1)
        torch.testing.assert_close(kept[0], log_c[0] + 1.5 * (log_c[0] - log_u[0]))
    assert trajectory("velocity")[2] is None


def test_confidence_step_is_the_quantile_of_the_steps_clamped():
    assert [confidence_step(4, q) for q in (0.01, 0.25, 0.5, 0.7, 0.99, 1.0)] == [0, 1, 2, 2, 3, 3]  # floor
    assert confidence_step(256, 0.5) == 128 and confidence_step(1, 1.0) == 0
