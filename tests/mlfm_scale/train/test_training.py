"""End-to-end training runs through `mlfm train` under torchrun (gloo, CPU): ZeRO-3, TP × DP parity, exact
resume, data sharding, refused checkpoints and shards. Small: a 2-layer d=32 model on 32-token blocks."""
import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, SMALL_MODEL

pytestmark = pytest.mark.multiprocess
STEPS = 8
BASE = [*SMALL_MODEL, f"train.steps={STEPS}", "train.micro_batch_size=4", "train.warmup_steps=2", "train.eval_every=4",
        "train.eval_batches=2", "log.every=1", "log.plot_every=4", "log.sample_ids=true", "checkpoint.every=4",
        "checkpoint.keep_last=3"]


def train(out, shards, nproc, *overrides, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mlfm_scale.cli", "train", "configs/tiny.yaml", f"out_dir={out}", f"data.root={shards}",
           *BASE, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, {r["step"]: r for r in rows if "val_loss" in r}


def samples(out, rank):
    return [json.loads(line) for line in (out / "samples" / f"rank{rank:05d}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dp2(dp2_run):
    """The reference: TP=1 × DP=2, ZeRO-3, 8 steps, checkpoints at 4 and 8 (shared with the reshard tests)."""
    return dp2_run


def test_zero3_two_ranks_trains_and_checkpoints(dp2):
    losses, evals = metrics(dp2)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]
    assert evals[8]["val_loss"] < evals[4]["val_loss"]
    assert evals[8]["val_loss_ema"] != evals[8]["val_loss"]  # the EMA swap reaches ZeRO-3's gathered weights
    ckpts = dp2 / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000008"
    for tag in ("step00000004", "step00000008"):
        info = json.loads((ckpts / tag / "checkpoint.json").read_text())
        assert info["world_size"] == 2 and info["dp"] == 2 and {"rank00000.pt", "rank00001.pt"} <= set(info["files"])
    assert (dp2 / "loss.png").stat().st_size > 0 and (dp2 / "gamma.png").stat().st_size > 0
    assert info["embedding_rms"] == pytest.approx((2 / (5 * 32)) ** 0.5, rel=0.05)  # LitGPT's √(2/(5d)), d = 32


def test_decision_diagnostic_is_logged_at_each_evaluation(dp2):
    rows = [json.loads(line) for line in (dp2 / "metrics.jsonl").read_text().splitlines()]
    profiles = {r["step"]: r["decision"] for r in rows if "decision" in r}
    assert sorted(profiles) == [4, 8]
    profile = profiles[8]
    assert len(profile["gamma"]) == 17 and profile["gamma"][0] == -10.0 and profile["gamma"][-1] == 6.0
    assert all(0.0 <= a <= 1.0 for a in profile["accuracy"]) and all(c > 0.0 for c in profile["ce"])
    windows = {r["step"]: r for r in rows if "decision_mid" in r}
    if profile["window"] is not None:
        assert windows[8]["decision_mid"] == profile["window"]["mid"] and "decision_misplaced" in windows[8]

def test_data_parallel_ranks_read_disjoint_samples(dp2):
    r0, r1 = samples(dp2, 0), samples(dp2, 1)
    ids0 = [i for row in r0 for i in row["block_ids"]]
    ids1 = [i for row in r1 for i in row["block_ids"]]
    assert len(ids0) == len(ids1) == STEPS * 4
    assert not set(ids0) & set(ids1) and len(set(ids0)) == len(ids0)


def test_resume_is_exact_and_continues_the_sample_stream(dp2, shards, tmp_path):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(dp2 / "checkpoints" / "step00000004", out / "checkpoints" / "step00000004")
    (out / "checkpoints" / "latest").write_text("step00000004")
    train(out, shards, 2, "train.resume=auto")
    ref, _ = metrics(dp2)
    resumed, _ = metrics(out)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:  # CPU fp32: bitwise
        assert resumed[step] == ref[step], (step, resumed[step], ref[step])
    for rank in (0, 1):
        assert samples(out, rank) == [row for row in samples(dp2, rank) if row["step"] > 4]


def test_tensor_parallel_layouts_match_tp1(dp2, shards, tmp_path):
    """TP=2 × DP=2 (4 processes) against TP=1 × DP=2; TP=2 × DP=1 against TP=1 × DP=1 (with 2 accumulated
    micro-batches): same data, weights and corruption draws, so the losses agree to float32 reduction-order
    noise (rel 1e-5)."""
    ref2, evals2 = metrics(dp2)
    train(tmp_path / "tp2dp2", shards, 4, "parallel.tp=2", "checkpoint.every=100")
    tp2dp2, evals = metrics(tmp_path / "tp2dp2")
    for step in ref2:
        assert tp2dp2[step] == pytest.approx(ref2[step], rel=1e-5, abs=1e-6), step
    assert evals[8]["val_loss_ema"] == pytest.approx(evals2[8]["val_loss_ema"], rel=1e-5)
    run = tmp_path / "tp2dp2"  # ranks 0, 1: TP peers of DP rank 0; ranks 2, 3: of DP rank 1
    assert samples(run, 1) == samples(run, 0) == samples(dp2, 0)
    assert samples(run, 3) == samples(run, 2) == samples(dp2, 1)

    accumulate = ("train.grad_accum=2", "checkpoint.every=100")  # and gradient accumulation on this pair
    train(tmp_path / "tp1", shards, 1, *accumulate)
    train(tmp_path / "tp2", shards, 2, "parallel.tp=2", *accumulate)
    tp1, _ = metrics(tmp_path / "tp1")
    tp2, _ = metrics(tmp_path / "tp2")
    assert len(samples(tmp_path / "tp1", 0)) == 2 * STEPS  # two micro-batches per step
    for step in tp1:
        assert tp2[step] == pytest.approx(tp1[step], rel=1e-5, abs=1e-6), step


def test_a_damaged_checkpoint_is_refused_by_name_and_auto_resume_falls_back(dp2, shards, tmp_path):
    """latest's checkpoint truncated: named by tag it is refused; train.resume=auto warns, names the file and
    resumes from the newest checkpoint that verifies."""
    out = tmp_path / "corrupt"
    shutil.copytree(dp2 / "checkpoints", out / "checkpoints")
    victim = out / "checkpoints" / "step00000008" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:-100])
    result = train(out, shards, 2, f"train.resume={out / 'checkpoints' / 'step00000008'}", "train.steps=12",
                   check=False)
    assert result.returncode != 0
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt has" in result.stderr and "truncated" in result.stderr
    result = train(out, shards, 2, "train.resume=auto", "train.steps=10")
    assert f"WARNING: {out / 'checkpoints' / 'latest'}" in result.stderr and "truncated" in result.stderr
    assert f"resuming from {out / 'checkpoints' / 'step00000004'}" in result.stderr
    losses, _ = metrics(out)
    assert sorted(losses) == list(range(5, 11))
    assert (out / "checkpoints" / "latest").read_text() == "step00000010"


def test_shards_that_do_not_fit_the_config_are_refused(shards, tmp_path):
    cmd = [sys.executable, "-m", "mlfm_scale.cli", "train", "configs/tiny.yaml", f"out_dir={tmp_path}",
           f"data.root={shards}", *BASE, "data.seq_len=64"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1
    assert "shards have seq_len 32, config data.seq_len is 64" in result.stderr and "Traceback" not in result.stderr


def test_repeated_non_finite_steps_stop_naming_the_last_checkpoint(shards, tmp_path):
    """An absurd learning rate blows the weights up after the first update; DeepSpeed skips the non-finite
    steps, we count them, and the second in a row stops the run with the last good checkpoint named."""
    result = train(tmp_path, shards, 1, "train.lr=1e30", "train.warmup_steps=0", "train.max_bad_steps=2",
                   "checkpoint.every=1", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "2 non-finite steps in a row" in output and "last good checkpoint:" in output
    assert "checkpoints/step0000000" in output.split("last good checkpoint:")[1]
