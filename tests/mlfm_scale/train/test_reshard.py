"""Resume on another layout: DP 2 → 1 and 1 → 2, TP 2 → 1 (all through `mlfm train train.resume=…`), and the
layout-free form carrying weights, AdamW moments and step, EMA, loader position and γ curve exactly."""
import shutil

import pytest
import torch

from mlfm_scale.cli import main
from mlfm_scale.train.manager import components
from mlfm_scale.train.reshard import current_universal
from mlfm_scale.train.universal import KINDS, CheckpointReader
from tests.distributed import run_distributed
from tests.mlfm_scale.conftest import PIPELINE
from tests.mlfm_scale.test_export import probe_inputs
from tests.mlfm_scale.train.engine_worker import load_and_probe
from tests.mlfm_scale.train.test_training import BASE, STEPS, metrics, samples, train

pytestmark = pytest.mark.multiprocess
RESUMED = list(range(STEPS // 2 + 1, STEPS + 1))


@pytest.fixture(scope="module")
def dp1_run(tmp_path_factory, shards):
    """TP=1 × DP=1 with 2 accumulated micro-batches (the global batch of DP=2), checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("dp1")
    train(out, shards, 1, "train.grad_accum=2")
    return out


def resume(run, shards, out, nproc, *overrides):
    """Continue ``run`` from its step-4 checkpoint (a copy) on ``nproc`` processes with ``overrides``."""
    tag = out / "source" / "step00000004"
    shutil.copytree(run / "checkpoints" / "step00000004", tag)
    train(out, shards, nproc, f"train.resume={tag}", *overrides)
    return out


def blocks_per_step(run, ranks):
    """{step: sorted block ids of the global batch}, from the ranks' sample logs."""
    out = {}
    for rank in ranks:
        for row in samples(run, rank):
            out.setdefault(row["step"], []).extend(row["block_ids"])
    return {step: sorted(ids) for step, ids in out.items()}


def check_continues(ref, ref_ranks, resumed, resumed_ranks, tolerance):
    """The resumed run trains steps 5–8 on exactly the global batches the uninterrupted run trained on (no
    sample repeated or skipped), with losses within ``tolerance`` of it."""
    ref_blocks, new_blocks = blocks_per_step(ref, ref_ranks), blocks_per_step(resumed, resumed_ranks)
    assert sorted(new_blocks) == RESUMED
    for step in RESUMED:
        assert new_blocks[step] == ref_blocks[step], step
    ref_losses, losses = metrics(ref)[0], metrics(resumed)[0]
    assert sorted(losses) == RESUMED
    for step in RESUMED:
        assert losses[step] == pytest.approx(ref_losses[step], **tolerance), step
    return ref_losses, losses


# Changing the data-parallel size changes the seeds of the corruption draws (they are keyed by DP rank and
# micro-batch), so the same samples get other masks, γ and bridge noise: the loss of a step moves by the
# corruption noise of a 8-sequence batch (measured ≈ 0.002–0.02 here, with the loss ≈ 5.6 and its step-to-step
# changes ≈ 0.03), hence 0.05 per step and 0.015 on the mean of the 4 steps. A lost optimizer state (fresh
# moments with the restored weights) or LR schedule shows as ≥ 0.05 on the first steps.
DP_TOLERANCE = {"abs": 0.05, "rel": 0}


def test_resume_two_to_one_data_parallel(dp2_run, shards, tmp_path):
    ref, new = check_continues(dp2_run, (0, 1), resume(dp2_run, shards, tmp_path, 1, "train.grad_accum=2"),
                               (0,), DP_TOLERANCE)
    assert abs(sum(new[s] - ref[s] for s in RESUMED) / len(RESUMED)) < 0.015


def test_resume_one_to_two_data_parallel(dp1_run, shards, tmp_path):
    ref, new = check_continues(dp1_run, (0,), resume(dp1_run, shards, tmp_path, 2), (0, 1), DP_TOLERANCE)
    assert abs(sum(new[s] - ref[s] for s in RESUMED) / len(RESUMED)) < 0.015


def test_resume_tensor_parallel_two_to_one(tp2_run, shards, tmp_path):
    """TP peers draw the same corruption as a TP=1 run at the same DP rank, so the continued losses equal the
    uninterrupted TP=2 run's up to float32 reduction-order noise (rel 1e-5, as TP=2 vs TP=1 training)."""
    resumed = resume(tp2_run, shards, tmp_path, 1)
    check_continues(tp2_run, (0,), resumed, (0,), {"rel": 1e-5, "abs": 1e-6})
    assert metrics(resumed)[1][8]["val_loss_ema"] == pytest.approx(metrics(tp2_run)[1][8]["val_loss_ema"], rel=1e-5)


def test_resume_pipeline_on_one_stage(pp2_run, shards, tmp_path):
    """PP=2 (two processes) → PP=1 (one): the same DP rank draws the same corruption and PP=2 trains like one
    stage, so the continued losses equal the uninterrupted PP=2 run's up to float32 noise (rel 1e-5)."""
    resumed = resume(pp2_run, shards, tmp_path, 1, *PIPELINE)
    check_continues(pp2_run, (0,), resumed, (0,), {"rel": 1e-5, "abs": 1e-6})


def test_layout_free_form_carries_the_state_exactly(tp2_run, shards, tmp_path, capsys):
    """TP=2 × DP=1 ZeRO-3 → TP=1 × DP=2 ZeRO-1 (TP, DP and ZeRO stage all change), saved again: every parameter's
    weights, AdamW moments and EMA, the AdamW step, the LR schedule, loader position, γ curve and decision profile
    are unchanged."""
    source = tmp_path / "step00000004"
    shutil.copytree(tp2_run / "checkpoints" / "step00000004", source)
    assert main(["reshard", str(source)]) == 0 and "universal" in capsys.readouterr().out
    assert current_universal(source)
    saved = tmp_path / "resaved"
    overrides = [*BASE, f"data.root={shards}", "parallel.zero_stage=1"]
    run_distributed(load_and_probe, 2, overrides, str(source), probe_inputs(), str(saved))
    before, after = CheckpointReader(source), CheckpointReader(saved / "step00000004")
    assert (after.tp, after.dp, after.stage) == (1, 2, 1)
    old, new = before.read(), after.read()
    for kind in KINDS:
        assert old[kind].keys() == new[kind].keys()
        for name in old[kind]:
            assert torch.equal(old[kind][name], new[kind][name]), (kind, name)
    assert before.optimizer_step() == after.optimizer_step() == 4
    schedules = before.client_state()["lr_scheduler"], after.client_state()["lr_scheduler"]
    assert schedules[0]["last_epoch"] == schedules[1]["last_epoch"] == 4 and schedules[0] == schedules[1]
    assert after.client_state()["global_steps"] == 4
    a, b = components(before.client_state()), components(after.client_state())
    assert a.keys() == b.keys() >= {"counters", "loader", "objective", "rng", "decision", "metrics"}
    assert a["loader"] == b["loader"] and a["counters"] == b["counters"] and a["metrics"] == b["metrics"]
    assert a["decision"] is not None and a["decision"] == b["decision"]  # the latest decision profile
    curve_a, curve_b = a["objective"]["curve"], b["objective"]["curve"]  # statistics, knots (None: no fit yet)
    assert curve_a.keys() == curve_b.keys() and float(curve_a["counts"].sum()) > 0
    for key, value in curve_a.items():
        assert torch.equal(value, curve_b[key]) if torch.is_tensor(value) else value == curve_b[key], key
    # a layout-free form is used only for the files it was written from: a re-saved source makes it stale
    manifest = source / "checkpoint.json"
    manifest.write_text(manifest.read_text().replace('"step": 4', '"step": 4, "resaved": true', 1))
    assert not current_universal(source)
