"""Pipeline stages (DeepSpeed PipelineModule over megatron layers, ZeRO-1): the same weights, corruption,
losses and gradients as the one-stage model; TP × PP; exact resume; refused settings."""
import json
import shutil

import pytest
import torch

from mlfm_scale.config import Config, ModelSection, load_config
from mlfm_scale.errors import UserError
from mlfm_scale.model.mlfm import MLFMModel
from mlfm_scale.parallel.pipeline import LayerStage, Targets, check_supported
from tests.mlfm_scale.conftest import PIPELINE
from tests.mlfm_scale.train.test_training import STEPS, metrics, samples, train

MODEL = ModelSection(num_layers=3, hidden_size=32, num_heads=4, ffn_hidden_size=64, time_embed_dim=16,
                     time_hidden_size=24)


def test_a_stage_builds_the_same_layer_weights_as_the_whole_model(process_group):
    """Each piece draws its weights from (seed, piece): layer 2 built alone equals layer 2 of the model."""
    cfg = Config(model=MODEL, seed=7)
    whole = MLFMModel(MODEL, 50, seed=7)
    alone = LayerStage(cfg, torch.float32, "sdpa", layer_number=2)
    theirs = dict(whole.decoder.layers[1].named_parameters())
    mine = dict(alone.layer.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, p in mine.items():
        assert torch.equal(p, theirs[name]), name
    other = LayerStage(cfg, torch.float32, "sdpa", layer_number=3)
    assert not torch.equal(other.layer.mlp.linear_fc1.weight, alone.layer.mlp.linear_fc1.weight)


def test_per_sequence_floats_cross_stages_bit_exactly():
    gamma, p = torch.tensor([-3.25, 0.1, 5.0]), torch.tensor([0.5, 1e-7, 1.0])
    draw = type("D", (), {"gamma": gamma, "p": p, "corrupted": torch.ones(3, 4, dtype=torch.bool),
                          "valid": torch.ones(3, 4, dtype=torch.bool)})
    batch = type("B", (), {"tokens": torch.zeros(3, 4, dtype=torch.long), "lengths": torch.full((3,), 4)})
    targets = Targets.from_draw(batch, draw)
    assert all(not t.is_floating_point() for t in targets.tensors())
    assert torch.equal(targets.gamma, gamma) and torch.equal(targets.p, p)


@pytest.mark.parametrize("overrides, message", [
    (["objective.mse_weight=0.1"], "objective.mse_weight > 0 needs the clean embeddings"),
    (["model.num_layers=1"], "need at least as many layers"),
    (["sample.validation.every=10"], "sample.validation.every > 0 samples with the whole model on one rank"),
    (["model.time_mlp=per_layer"], "model.time_mlp=per_layer is not supported with parallel.pp > 1"),
])
def test_pipeline_settings_it_cannot_run_are_refused(overrides, message):
    cfg = load_config(None, ["parallel.pp=2", "parallel.zero_stage=1", *overrides])
    with pytest.raises(UserError, match=message):
        check_supported(cfg)


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def one_stage(tmp_path_factory, shards):
    """The reference: one process, no pipeline, ZeRO-1, 4 micro-batches per step."""
    out = tmp_path_factory.mktemp("pp1")
    train(out, shards, 1, *PIPELINE)
    return out


@pytest.fixture(scope="module")
def two_stages(pp2_run):
    return pp2_run


@pytest.mark.multiprocess
def test_two_stages_match_one_stage(one_stage, two_stages):
    """Same weights, data and corruption draws: losses, gradient norms and validation losses agree to float32
    reduction-order noise (rel 1e-6; on this machine they are bitwise equal)."""
    ref, ref_evals = metrics(one_stage)
    got, evals = metrics(two_stages)
    assert sorted(got) == list(range(1, STEPS + 1))
    rows = {r["step"]: r for r in map(json.loads, (one_stage / "metrics.jsonl").read_text().splitlines())
            if "grad_norm" in r}
    mine = {r["step"]: r for r in map(json.loads, (two_stages / "metrics.jsonl").read_text().splitlines())
            if "grad_norm" in r}
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6), step
        assert mine[step]["grad_norm"] == pytest.approx(rows[step]["grad_norm"], rel=1e-6), step
    for key in ("val_loss", "val_loss_ema"):
        assert evals[STEPS][key] == pytest.approx(ref_evals[STEPS][key], rel=1e-6)
    assert samples(two_stages, 0) == samples(one_stage, 0)  # the first stage reads what the one stage read
    assert not (two_stages / "samples" / "rank00001.jsonl").exists()  # the last stage reads nothing
    info = json.loads((two_stages / "checkpoints" / "step00000008" / "checkpoint.json").read_text())
    assert (info["pp"], info["dp"], info["zero_stage"], info["stages"]) == (2, 1, 1, [0, 2, 4])


@pytest.mark.multiprocess
def test_two_stages_resume_exactly(two_stages, shards, tmp_path):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(two_stages / "checkpoints" / "step00000004", out / "checkpoints" / "step00000004")
    (out / "checkpoints" / "latest").write_text("step00000004")
    train(out, shards, 2, *PIPELINE, "parallel.pp=2", "train.resume=auto")
    ref, ref_evals = metrics(two_stages)
    resumed, evals = metrics(out)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:  # CPU fp32: bitwise, EMA included
        assert resumed[step] == ref[step], step
    for key in ("val_loss", "val_loss_ema"):
        assert evals[STEPS][key] == ref_evals[STEPS][key], key
    assert samples(out, 0) == [row for row in samples(two_stages, 0) if row["step"] > 4]


@pytest.mark.multiprocess
def test_tensor_and_pipeline_parallel_match_one_stage(one_stage, shards, tmp_path):
    """TP=2 × PP=2 (4 processes), stages balanced by parameter count, against one process (rel 1e-5)."""
    train(tmp_path / "tp2pp2", shards, 4, *PIPELINE, "parallel.pp=2", "parallel.tp=2", "parallel.partition=parameters",
          "checkpoint.every=100")
    ref, _ = metrics(one_stage)
    got, _ = metrics(tmp_path / "tp2pp2")
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    assert samples(tmp_path / "tp2pp2", 1) == samples(tmp_path / "tp2pp2", 0) == samples(one_stage, 0)
