"""`mlfm launch` / `mlfm jobs` on the real local SLURM cluster (ops/local-slurm/up.sh; `make test` starts it).

One set of jobs serves the end-to-end tests, submitted together so they overlap (each takes one core on each
of the two nodes): A trains 60 steps on 2 nodes (one gloo rank per node) uninterrupted; B is the same run,
signalled with USR2 (SLURM's preemption/time-limit warning) a few steps in, so it checkpoints, requeues itself
and resumes; C continues A's run to 80 steps, submitted with `--after A`; D exports A's run (`export` job kind)
after C; E distils a flow-map student from A's checkpoints (`distill` job kind, 8 steps) after C; F evaluates D's
export on 2 nodes (`eval` job kind: the validity task, data-parallel) after D.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from launchers import slurm
from mlfm_scale.config import load_config
from mlfm_scale.train.universal import open_checkpoint
from tests.conftest import REPO, SMALL_MODEL

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess]
STEPS, MORE, DISTILL = 60, 80, 8
EVAL = ["eval.tasks=[validity]", "eval.limit=2", "eval.steps=[2]"]
RUN = [*SMALL_MODEL, "train.micro_batch_size=4", "train.warmup_steps=2", "train.eval_every=20",
       "train.eval_batches=2", "log.every=1", "log.plot_every=1000", "checkpoint.every=20", "checkpoint.keep_last=5"]
LAUNCH = [sys.executable, "-m", "mlfm_scale.cli", "launch"]
UP = "start it with `ops/local-slurm/up.sh` (as root; `make test` does)"


@pytest.fixture(scope="module")
def cluster():
    """Fails (does not skip) when the local cluster is not up: CI starts it, so its absence is a failure."""
    try:
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.fail(f"SLURM is not installed here: {UP}")
    states = dict(line.split() for line in nodes.stdout.splitlines())
    usable = [n for n, s in states.items() if s.rstrip("*") in ("idle", "mix", "alloc")]
    if nodes.returncode or len(usable) < 2:
        pytest.fail(f"the local SLURM cluster is not up (sinfo: {states or nodes.stderr.strip()}): {UP}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of `mlfm` subprocesses: the job index in a temporary file."""
    return os.environ | {"MLFM_JOBS_INDEX": str(tmp_path_factory.mktemp("index") / "jobs.jsonl")}


def mlfm(args, env, check=True):
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def launch(env, *args, kind="pretrain", nodes=2) -> str:
    out = mlfm([*LAUNCH, kind, "configs/tiny.yaml", "--cluster", "local", "--nodes", str(nodes), *args], env).stdout
    return re.search(rf"submitted {kind} job (\d+)", out)[1]


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


def reached(out_dir, step: int) -> bool:
    try:
        return max(losses(out_dir), default=0) >= step
    except (FileNotFoundError, json.JSONDecodeError):  # not started, or a line being written
        return False


def wait(condition, seconds: float, what: str, logs=()):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for d in logs for p in sorted(d.glob("*_log.*")))
            pytest.fail(f"timed out after {seconds} s waiting for {what}; queue: {slurm.queue_states()}\n{tails}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def jobs(cluster, shards, env, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-runs")
    a, b, e = root / "a", root / "b", root / "e"
    common = [f"data.root={shards}", *RUN]
    ids = {"a": launch(env, f"out_dir={a}", f"train.steps={STEPS}", *common)}
    try:
        # B starts once A trains: two jobs building their streaming datasets on one node at the same instant race
        # in streaming's shared-memory registration (FileExistsError '/00000N_locals'; streaming's own race)
        wait(lambda: reached(a, 1), 240, "job A's first step", [a / "slurm" / ids["a"]])
        ids["b"] = launch(env, f"out_dir={b}", f"train.steps={STEPS}", *common)
        ids["c"] = launch(env, "--after", ids["a"], f"out_dir={a}", f"train.steps={MORE}", *common)
        ids["d"] = launch(env, "--after", ids["c"], f"out_dir={a}", *common, kind="export", nodes=1)
        # after C, not A: C and E starting at once would race in streaming's registration (above); D builds none
        ids["e"] = launch(env, "--after", ids["c"], f"out_dir={e}", f"distill.teacher={a / 'checkpoints'}",
                          f"train.steps={DISTILL}", *common, "checkpoint.every=4", kind="distill")
        ids["f"] = launch(env, "--after", ids["d"], f"out_dir={a}", *common, *EVAL, kind="eval")
        c_waits = slurm.queue_states()[ids["c"]]
        wait(lambda: reached(b, 3), 240, "job B's step 3", [b / "slurm" / ids["b"]])
        signalled = max(losses(b))
        subprocess.run(["scancel", "--signal=USR2", ids["b"]], check=True)
        done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        wait(lambda: all(slurm.queue_states()[i][0] in done for i in ids.values()), 540, "all jobs to end",
             [a / "slurm" / ids[k] for k in "acdf"] + [b / "slurm" / ids["b"], e / "slurm" / ids["e"]])
    finally:
        subprocess.run(["scancel", *ids.values()], capture_output=True)
    return {"ids": ids, "a": a, "b": b, "e": e, "c_waits": c_waits, "signalled": signalled,
            "states": slurm.queue_states()}


def test_two_node_pretrain_trains_and_checkpoints(jobs):
    a, job = jobs["a"], jobs["ids"]["a"]
    assert jobs["states"][job][0] == "COMPLETED"
    first = losses(a)
    assert set(range(1, STEPS + 1)) <= set(first) and first[STEPS] < first[1]
    for step in (20, 40, 60):
        info = json.loads((a / "checkpoints" / f"step{step:08d}" / "checkpoint.json").read_text())
        assert info["world_size"] == 2 and info["dp"] == 2
    folder = a / "slurm" / job
    logs = [(folder / f"{job}_{rank}_log.out").read_text() for rank in (0, 1)]
    assert "node=0(2), global_rank=0(2)" in logs[0] and "node=1(2), global_rank=1(2)" in logs[1]  # one rank a node
    assert f"step {STEPS}/{STEPS}" in logs[0]
    stored = load_config(folder / "config.yaml")  # the resolved config, stored with the job
    assert stored.launch.nodes == 2 and stored.launch.partition == "debug" and stored.train.resume == "auto"
    assert stored.out_dir == str(a) and stored.train.steps == STEPS


def test_preempted_job_checkpoints_requeues_and_ends_like_an_uninterrupted_run(jobs):
    b, job = jobs["b"], jobs["ids"]["b"]
    assert jobs["states"][job][0] == "COMPLETED"
    resumed = [r["resumed_from"] for r in metrics(b) if "resumed_from" in r]
    assert len(resumed) == 1 and jobs["signalled"] <= resumed[0] < STEPS  # stopped at a step boundary, mid-run
    log = (b / "slurm" / job / f"{job}_0_log.out").read_text()
    assert f"stopped at step {resumed[0]} with checkpoint" in log and f"requeueing job {job}" in log
    assert "Restarts=1" in subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    reference, run = losses(jobs["a"]), losses(b)
    assert sorted(run) == list(range(1, STEPS + 1))
    assert run[STEPS] == reference[STEPS]  # CPU fp32 resume is bitwise
    assert all(run[s] == reference[s] for s in run)


def test_chained_job_waits_for_its_dependency_then_continues(jobs):
    a, job = jobs["a"], jobs["ids"]["c"]
    assert jobs["c_waits"] == ("PENDING", "Dependency")
    assert jobs["states"][job][0] == "COMPLETED"
    resumed = [r["resumed_from"] for r in metrics(a) if "resumed_from" in r]
    assert resumed == [STEPS]  # started from A's last checkpoint: A had ended
    assert set(range(STEPS + 1, MORE + 1)) <= set(losses(a))
    assert (a / "checkpoints" / "latest").read_text() == f"step{MORE:08d}"


def test_export_job_chained_after_training_consolidates_its_latest_checkpoint(jobs):
    a, job = jobs["a"], jobs["ids"]["d"]
    assert jobs["states"][job][0] == "COMPLETED"
    config = json.loads((a / "export" / "config.json").read_text())
    assert config["source_checkpoint"] == str(a / "checkpoints" / f"step{MORE:08d}") and config["weights"] == "ema"
    assert (a / "export" / "model.safetensors").stat().st_size > 0


def test_distill_job_chained_after_pretraining_trains_the_student(jobs):
    a, e, job = jobs["a"], jobs["e"], jobs["ids"]["e"]
    assert jobs["states"][job][0] == "COMPLETED"
    assert set(range(1, DISTILL + 1)) <= set(losses(e))
    tag = e / "checkpoints" / f"step{DISTILL:08d}"
    assert (tag / "checkpoint.json").is_file()
    teacher = open_checkpoint(tag).client_state()["components"]["teacher"]
    assert teacher["teacher"].startswith(str(a / "checkpoints")), teacher  # the tag of A's run it distilled
    stored = load_config(e / "slurm" / job / "config.yaml")
    assert stored.model.flow_map and stored.out_dir == str(e) and stored.distill.teacher == str(a / "checkpoints")


def test_eval_job_chained_after_the_export_matches_one_local_rank(jobs, env, tmp_path):
    a, job = jobs["a"], jobs["ids"]["f"]
    assert jobs["states"][job][0] == "COMPLETED"
    two_nodes = json.loads((a / "eval" / "steps2" / "validity" / "metrics.json").read_text())
    assert two_nodes["n"] == 4 and len(two_nodes["samples"]) == 4
    mlfm([sys.executable, "-m", "mlfm_scale.cli", "eval", "validity", "--model", str(a / "export"), "--out",
          str(tmp_path), "--limit", "2", "--steps", "2"], env)
    one_rank = json.loads((tmp_path / "steps2" / "validity" / "metrics.json").read_text())
    assert one_rank["samples"] == two_nodes["samples"]  # prompts sharded over the nodes, seeded by their index


def test_jobs_lists_state_and_latest_checkpoint(jobs, env):
    out = mlfm([sys.executable, "-m", "mlfm_scale.cli", "jobs"], env).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    for name, latest in (("a", MORE), ("b", STEPS), ("c", MORE)):
        row = rows[jobs["ids"][name]]
        assert row[1] == "pretrain" and row[3] == "COMPLETED" and row[-2] == str(latest), row


def test_dry_run_prints_the_script_and_each_task_command(cluster, tmp_path):
    env = os.environ | {"MLFM_JOBS_INDEX": str(tmp_path / "jobs.jsonl")}
    out = mlfm([*LAUNCH, "pretrain", "configs/tiny.yaml", "--cluster", "local", "--nodes", "2", "--after", "41",
                "--time", "00:05:00", f"out_dir={tmp_path}", "--dry-run"], env).stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=debug",
                 "#SBATCH --time=5", "#SBATCH --signal=USR2@60", "#SBATCH --requeue", "#SBATCH --dependency=afterok:41",
                 f"#SBATCH --output={tmp_path}/slurm/%j/%j_0_log.out", "export DS_ACCELERATOR=cpu",
                 f"export PYTHONPATH={REPO}", "srun --unbuffered", f"{sys.executable} -u -m submitit.core._submit",
                 "WORLD_SIZE = 2", "gloo (CPU)", "train.resume=auto"):
        assert line in out, line
    assert not (tmp_path / "slurm").exists() and not (tmp_path / "jobs.jsonl").exists()  # nothing submitted


@pytest.mark.parametrize("args, message", [
    (["--partition", "gpu"], "partition 'gpu' does not exist on this cluster (partitions: debug)"),
    (["--nodes", "0"], "nodes (launch.nodes, --nodes): Input should be greater than or equal to 1 (got 0)"),
    (["--nodes", "3"], "--nodes 3: partition 'debug' has 2 node(s)"),
    (["--after", "last"], "--after last: not a SLURM job id"),
    (["--cluster", "nowhere"], "unknown cluster profile 'nowhere'"),
    (["--time", "2h"], "'2h' is not a SLURM time"),
], ids=["partition", "zero-nodes", "too-many-nodes", "after", "profile", "time"])
def test_bad_cluster_arguments_are_refused(cluster, env, args, message):
    result = mlfm([*LAUNCH, "pretrain", "configs/tiny.yaml", "--cluster", "local", *args], env, check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
