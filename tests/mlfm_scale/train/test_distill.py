"""Flow-map distillation (`mlfm distill`): the time pairs, the objective's treatment of observed positions, and
runs on the trainer (ZeRO-3 exact resume, TP = 2 ≡ TP = 1, EMA targets, the teacher's record and the refusals),
then the student's export sampled with method=flowmap."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mlfm_scale.config import load_config
from mlfm_scale.data.batch import MicroBatch
from mlfm_scale.model.mlfm import MLFMModel
from mlfm_scale.train.distill import Q_MAX, DistillObjective, draw_time_pairs
from tests.conftest import REPO, SMALL_MODEL
from tests.mlfm_scale.train.test_training import metrics, train

V = 64
RUN = [*SMALL_MODEL, "train.micro_batch_size=4", "train.warmup_steps=2", "train.eval_every=3", "train.eval_batches=2",
       "log.every=1", "log.plot_every=3", "checkpoint.every=3", "train.schedule_steps=6"]


def test_time_pairs_are_ordered_with_the_asked_diagonal_rows_and_boundary_jumps():
    g = torch.Generator().manual_seed(0)
    pairs = draw_time_pairs(4000, 1000, 0.1, g)
    assert int(pairs.diagonal.sum()) == 1000
    assert bool((pairs.q_s >= pairs.q_u).all() and (pairs.q_u >= pairs.q_t).all() and (pairs.q_s <= Q_MAX).all())
    assert torch.equal(pairs.q_s[pairs.diagonal], pairs.q_t[pairs.diagonal])
    assert abs(float(pairs.q_s[pairs.diagonal].mean()) - Q_MAX / 2) < 0.03  # uniform over the grid's quantiles
    off = ~pairs.diagonal
    assert bool((pairs.q_t[off] < pairs.q_s[off]).all())
    assert torch.allclose(pairs.q_u, (pairs.q_s + pairs.q_t) / 2)
    boundary = off & (pairs.q_s == Q_MAX) & (pairs.q_t == 0)
    assert abs(float(boundary.sum()) / 3000 - 0.1) < 0.02


def test_observed_positions_stay_clean_and_get_no_gradient(process_group):
    settings = [*SMALL_MODEL, "model.flow_map=true", "objective.crop_probability=0",
                "distill.diagonal_fraction=0"]  # the target's passes then take every row
    cfg = load_config(REPO / "configs" / "tiny.yaml", settings)
    teacher = MLFMModel(cfg.model.model_copy(update={"flow_map": False}), V, seed=0)
    student = MLFMModel(cfg.model, V, seed=0)
    torch.nn.init.normal_(student.target_gamma_embedding.mlp[2].weight, std=0.5)  # a student that moved
    objective = DistillObjective(cfg, V - 1, (V - 3, V - 2), teacher, {})
    seen = []
    student.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    student.register_forward_hook(lambda module, args, out: out.retain_grad() if out.requires_grad else None)
    tokens = torch.randint(0, V - 3, (6, 32), generator=torch.Generator().manual_seed(1))
    batch = MicroBatch(tokens, torch.full((6,), 32), None, None)
    loss, rows = objective(student, batch, torch.Generator().manual_seed(2))
    loss.backward()
    replay = torch.Generator().manual_seed(2)  # the draw is the step's first use of its generator
    observed = ~objective.draw(objective.crop(batch, replay), replay).corrupted
    clean = teacher.embed(tokens)
    assert len(seen) == 3  # the two half-jumps of the target, then the step's jump
    for z, _ in seen:
        assert torch.equal(z[observed], clean[observed])
    logits = seen[-1][1]
    assert float(logits.grad[observed].abs().max()) == 0.0 and float(logits.grad[~observed].abs().max()) > 0
    assert torch.isfinite(loss) and set(rows) >= {"ce", "accuracy", "gamma", "mask_ratio", "tokens"}


# ---------------------------------------------------------------------------------------------- runs
def distill(out, shards, nproc, teacher, *overrides, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mlfm_scale.cli", "distill", "configs/tiny.yaml", f"out_dir={out}", f"data.root={shards}",
           f"distill.teacher={teacher}", *RUN, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def student(dp2_run, shards, tmp_path_factory):
    """A distillation of the dp2 run (ZeRO-3, DP = 2): 6 steps straight."""
    out = tmp_path_factory.mktemp("student")
    distill(out, shards, 2, dp2_run / "checkpoints", "train.steps=6")
    return out


pytestmark = pytest.mark.multiprocess


def client_state(tag_dir):
    from mlfm_scale.train.universal import open_checkpoint

    return open_checkpoint(tag_dir).client_state()


def test_distillation_resumes_exactly_and_records_its_teacher(student, dp2_run, shards, tmp_path):
    split = tmp_path / "split"
    distill(split, shards, 2, dp2_run / "checkpoints", "train.steps=3")
    distill(split, shards, 2, dp2_run / "checkpoints", "train.steps=6", "train.resume=auto")
    losses, evals = metrics(student)
    assert sorted(losses) == list(range(1, 7)) and metrics(split)[0] == losses and 6 in evals
    state = client_state(student / "checkpoints" / "step00000006")
    teacher = state["components"]["teacher"]
    assert teacher["teacher"] == str(dp2_run / "checkpoints" / "step00000008") and teacher["weights"] == "ema"
    assert state["components"]["origin"]["init_from"] == teacher["teacher"]  # the student starts as the teacher
    assert state["config"]["model"]["flow_map"] and state["components"]["decision"] is not None
    other = distill(split, shards, 2, dp2_run / "checkpoints" / "step00000004", "train.steps=7",
                    "train.resume=auto", check=False)
    assert other.returncode != 0 and "to the run's teacher" in other.stderr
    assert "manifest_sha256" in other.stderr


def test_a_config_distils_its_own_run_from_its_own_data():
    from mlfm_scale.train.loop import distill_config

    cfg = distill_config(load_config(REPO / "configs" / "tiny.yaml"))  # out_dir runs/demo, data root `data`
    assert cfg.out_dir == "runs/demo/distill" and cfg.distill.teacher == "runs/demo/checkpoints"
    assert cfg.path(cfg.data.root) == load_config(REPO / "configs" / "tiny.yaml").path("data").absolute()
    assert cfg.train.init_from == cfg.distill.teacher and cfg.model.flow_map
    preset = load_config(REPO / "configs" / "tiny-distill.yaml")  # the demo's student reads the demo's shards
    assert os.path.normpath(preset.path(preset.data.root).absolute()) == str(cfg.path(cfg.data.root))


def test_distillation_resumes_on_another_layout(student, dp2_run, shards, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(student / "checkpoints" / "step00000003", run / "checkpoints" / "step00000003")
    (run / "checkpoints" / "latest").write_text("step00000003")
    distill(run, shards, 1, dp2_run / "checkpoints", "train.steps=4", "train.resume=auto", "parallel.zero_stage=1")
    losses = metrics(run)[0]
    assert sorted(losses) == [4] and math.isfinite(losses[4])  # ZeRO-3 × 2 ranks → ZeRO-1 × 1, resharded
    teacher = client_state(run / "checkpoints" / "step00000004")["components"]["teacher"]
    assert teacher == client_state(student / "checkpoints" / "step00000006")["components"]["teacher"]


def test_tensor_parallel_distillation_matches_one_rank(dp2_run, shards, tmp_path):
    distill(tmp_path / "tp1", shards, 1, dp2_run / "checkpoints", "train.steps=2", "parallel.zero_stage=1")
    distill(tmp_path / "tp2", shards, 2, dp2_run / "checkpoints", "train.steps=2", "parallel.zero_stage=1",
            "parallel.tp=2")
    one, two = metrics(tmp_path / "tp1")[0], metrics(tmp_path / "tp2")[0]
    assert sorted(one) == [1, 2] and all(abs(one[s] - two[s]) < 1e-5 for s in one)


def test_ema_targets_with_decay_zero_equal_the_students(student, dp2_run, shards, tmp_path):
    distill(tmp_path / "ema", shards, 2, dp2_run / "checkpoints", "train.steps=3", "distill.target=ema",
            "train.ema_decay=0")  # the EMA is then the weights: swapping it in under ZeRO-3 must change nothing
    ema, straight = metrics(tmp_path / "ema")[0], metrics(student)[0]
    assert all(ema[s] == straight[s] for s in (1, 2, 3))


def test_a_teacher_of_another_network_the_run_itself_or_a_fresh_student_is_refused(dp2_run, shards, tmp_path):
    result = distill(tmp_path / "a", shards, 1, dp2_run / "checkpoints", "train.steps=1", "model.ffn_hidden_size=96",
                     "objective.sigma=0.3", "objective.mask_ratio=uniform", check=False)
    assert result.returncode != 0 and "model.ffn_hidden_size 64 (here 96), objective.sigma 0.2 (here 0.3);" in \
        result.stderr  # the student's own training law (mask ratio) may differ, not the teacher's bridge
    assert "set model.ffn_hidden_size=64 objective.sigma=0.2" in result.stderr
    result = distill(dp2_run, shards, 1, dp2_run / "checkpoints", "train.steps=1", check=False)
    assert result.returncode != 0 and "this run's own checkpoint directory" in result.stderr
    result = train(tmp_path / "b", shards, 1, f"distill.teacher={dp2_run / 'checkpoints'}", "model.flow_map=true",
                   check=False)  # `mlfm train` with a teacher: its student would start from random weights
    assert result.returncode != 0 and "whose student starts as its teacher" in result.stderr


def test_the_student_exports_and_samples_in_few_jumps(student, tmp_path, mlfm_cmd):
    export = tmp_path / "export"
    subprocess.run([*mlfm_cmd, "export", str(student / "checkpoints"), str(export)], check=True, cwd=REPO,
                   capture_output=True)
    config = json.loads((export / "config.json").read_text())
    assert config["model"]["flow_map"] and config["decision"] is not None
    out = subprocess.run([*mlfm_cmd, "sample", "--model", str(export), "--unconditional", "3", "--method",
                          "flowmap", "--steps", "2", "--length", "12"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for line in map(json.loads, out.stdout.splitlines()):
        assert line["method"] == "flowmap" and line["nfe"] == 2 * line["rounds"]
