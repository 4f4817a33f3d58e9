"""What a job runs, rendered without a cluster: the resolved config, the dry-run text, what a submission
(to a stand-in ``sbatch``) leaves in the job folder."""
import os
import subprocess
from pathlib import Path

import pytest

from launchers import options, slurm
from launchers.kinds import KINDS, PIPELINE, get
from launchers.options import resolve_launch, sbatch_parameters
from launchers.submit import dry_run_text, job_config, submit, submit_chain
from mlfm_scale.cli import main
from mlfm_scale.config import LaunchSection, load_config
from mlfm_scale.errors import UserError
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def test_job_config_is_absolute_and_resumes_automatically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    launch = resolve_launch(LaunchSection(), {"cluster": "local", "nodes": 2})
    cfg = job_config(get("pretrain"), load_config(REPO / "configs" / "tiny.yaml", ["out_dir=runs/x"]), launch)
    assert cfg.out_dir == str(tmp_path / "runs" / "x") and cfg.train.resume == "auto" and cfg.launch.nodes == 2
    kept = job_config(get("pretrain"), load_config(REPO / "configs" / "tiny.yaml", ["train.resume=/ckpt/step1"]),
                      launch)
    assert kept.train.resume == "/ckpt/step1"


def test_gpu_dry_run_text():
    launch = resolve_launch(LaunchSection(), {"cluster": "example-gpu", "nodes": 2})
    cfg = job_config(get("pretrain"), load_config(REPO / "configs" / "tiny.yaml"), launch)
    text = dry_run_text(get("pretrain"), cfg, sbatch_parameters(launch, "mlfm-pretrain-tiny", ["7"]))
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --nodes=2",
                 "#SBATCH --signal=USR2@300", "#SBATCH --requeue", "#SBATCH --dependency=afterok:7",
                 "#SBATCH --partition=gpu", "#SBATCH --account=my-project", "module load cuda/12.4 nccl",
                 "-u -m submitit.core._submit", "WORLD_SIZE = 16", "NCCL (one task per GPU)",
                 "mlfm_scale.train.loop:train(config); USR2 → checkpoint", "srun --unbuffered"):
        assert line in text, line


def test_pipeline_stages_are_registered_kinds_in_order():
    assert PIPELINE[0] == "pretrain" and "pretrain" in KINDS
    assert get("pretrain").load().__name__ == "train" and get("pretrain").preemptible


def test_a_chain_makes_each_job_wait_for_the_previous(capsys):
    launch = resolve_launch(LaunchSection(), {"cluster": "local", "nodes": 2})
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    ids = submit_chain([get("pretrain"), get("pretrain")], cfg, launch, ["5"], dry_run=True)
    scripts = capsys.readouterr().out.split("# mlfm launch pretrain")[1:]
    assert ids == ["PRETRAIN_JOB_ID"] * 2 and len(scripts) == 2
    assert "#SBATCH --dependency=afterok:5\n" in scripts[0]
    assert "#SBATCH --dependency=afterok:PRETRAIN_JOB_ID\n" in scripts[1]


def test_a_pipeline_exports_on_one_task_after_a_multi_node_pretrain(capsys):
    launch = resolve_launch(LaunchSection(), {"cluster": "example-gpu", "nodes": 2})
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    ids = submit_chain([get("pretrain"), get("export")], cfg, launch, [], dry_run=True)
    pretrain, export = capsys.readouterr().out.split("# mlfm launch ")[1:]
    assert ids == ["PRETRAIN_JOB_ID", "EXPORT_JOB_ID"]
    assert "#SBATCH --nodes=2" in pretrain and "#SBATCH --ntasks-per-node=8" in pretrain
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --dependency=afterok:PRETRAIN_JOB_ID", "mlfm_scale.export:export_latest"):
        assert line in export, line
    assert get("export").load().__name__ == "export_latest" and not get("export").preemptible


def test_distill_is_a_preemptible_stage_that_configures_the_chain():
    kind = get("distill")
    assert kind.load().__name__ == "distill" and kind.preemptible and not kind.single_task
    assert kind.configure == "mlfm_scale.train.loop:distill_config"
    assert PIPELINE.index("pretrain") < PIPELINE.index("distill") < PIPELINE.index("export")


def test_a_distill_job_runs_a_flow_map_student_from_its_teacher(tmp_path):
    launch = resolve_launch(LaunchSection(), {"cluster": "local"})
    cfg = job_config(get("distill"), load_config(TINY, [f"out_dir={tmp_path}"]), launch)
    teacher = str(tmp_path.resolve() / "checkpoints")
    assert cfg.out_dir == str(tmp_path.resolve() / "distill") and cfg.distill.teacher == teacher
    assert cfg.model.flow_map and cfg.train.init_from == teacher and cfg.train.resume == "auto"


def launch_dry_run(capsys, monkeypatch, *args: str) -> dict[str, str]:
    """``mlfm launch ARGS --dry-run`` on two nodes of the local profile: {kind: its dry-run text}."""
    monkeypatch.setattr(slurm, "check_request", lambda partition, nodes: None)  # no cluster needed
    assert main(["launch", *args, "--cluster", "local", "--nodes", "2", "--dry-run"]) == 0
    return {text.split()[0]: text for text in capsys.readouterr().out.split("# mlfm launch ")[1:]}


def test_a_pipeline_distils_the_pretrained_run_then_exports_the_student(tmp_path, capsys, monkeypatch):
    out = tmp_path.resolve()
    jobs = launch_dry_run(capsys, monkeypatch, "pipeline", TINY, f"out_dir={out}")
    assert list(jobs)[:3] == ["pretrain", "distill", "export"]
    assert f"config: out_dir={out} train.steps" in jobs["pretrain"] and "distill.teacher" not in jobs["pretrain"]
    for line in ("#SBATCH --dependency=afterok:PRETRAIN_JOB_ID\n", "#SBATCH --nodes=2", "#SBATCH --requeue",
                 "mlfm_scale.train.loop:distill(config); USR2 → checkpoint",
                 f"config: out_dir={out / 'distill'} ", f"distill.teacher={out / 'checkpoints'} "):
        assert line in jobs["distill"], line
    for line in ("#SBATCH --dependency=afterok:DISTILL_JOB_ID\n", "mlfm_scale.export:export_latest",
                 f"config: out_dir={out / 'distill'} "):  # exports the student
        assert line in jobs["export"], line


def test_a_distill_job_alone_trains_beside_its_default_teacher(tmp_path, capsys, monkeypatch):
    out = tmp_path.resolve()
    alone = launch_dry_run(capsys, monkeypatch, "distill", TINY, f"out_dir={out}")["distill"]
    assert f"config: out_dir={out / 'distill'} " in alone and f"distill.teacher={out / 'checkpoints'} " in alone
    given = launch_dry_run(capsys, monkeypatch, "distill", TINY, f"out_dir={out}", "distill.teacher=/runs/t/c")
    assert f"config: out_dir={out} " in given["distill"] and "distill.teacher=/runs/t/c " in given["distill"]


def test_a_pipeline_skipping_distill_is_the_chain_without_it(tmp_path, capsys, monkeypatch):
    out = tmp_path.resolve()
    jobs = launch_dry_run(capsys, monkeypatch, "pipeline", TINY, f"out_dir={out}", "--skip", "distill")
    assert list(jobs)[:2] == ["pretrain", "export"] and "distill" not in jobs
    cfg = load_config(TINY, [f"out_dir={out}"])
    submit_chain([get("pretrain"), get("export")], cfg, resolve_launch(cfg.launch, {"cluster": "local", "nodes": 2}),
                 [], dry_run=True)
    chain = capsys.readouterr().out.split("# mlfm launch ")[1:]
    assert [jobs["pretrain"], jobs["export"]] == chain
    assert f"config: out_dir={out} train.steps" in jobs["export"]


@pytest.mark.parametrize("args, message", [
    (["pretrain", "--skip", "distill"], "--skip distill: --skip leaves stages out of `mlfm launch pipeline`; a "
                                        "pretrain job has none"),
    (["pipeline", "--skip", "sft"], "--skip sft: not a registered stage of the pipeline (stages: pretrain, distill"),
    (["pipeline", "--skip", "nope"], "--skip nope: not a registered stage of the pipeline"),
    (["pipeline", *[a for s in PIPELINE for a in ("--skip", s) if s in KINDS]], "--skip leaves no stage"),
], ids=["not-a-pipeline", "not-a-stage", "unknown", "all"])
def test_a_bad_skip_is_refused(tmp_path, capsys, args, message):
    assert main(["launch", args[0], TINY, *args[1:], f"out_dir={tmp_path}", "--dry-run"]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == "", captured.err


def test_skipping_a_stage_that_is_not_registered_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delitem(KINDS, "export")
    assert main(["launch", "pipeline", TINY, "--skip", "export", f"out_dir={tmp_path}", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "--skip export: not a registered stage of the pipeline (stages: pretrain, distill" in err, err


def script_of(dry_run: str) -> str:
    return dry_run.split("sbatch script\n")[1].split("\n# ------")[0]


def test_pythonpath_survives_a_checkout_path_with_spaces_and_quotes(tmp_path, monkeypatch):
    repo = tmp_path / "my checkout's $HOME"
    monkeypatch.setattr(options, "REPO", repo)
    launch = resolve_launch(LaunchSection(), {"cluster": "local"})
    cfg = job_config(get("pretrain"), load_config(REPO / "configs" / "tiny.yaml", [f"out_dir={tmp_path}"]), launch)
    script = script_of(dry_run_text(get("pretrain"), cfg, sbatch_parameters(launch, "j", [])))
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    line = next(line for line in script.splitlines() if "PYTHONPATH=" in line)
    show = [f'{line}; printf %s "$PYTHONPATH"']
    env = {"PATH": os.environ["PATH"]}
    assert subprocess.run(["bash", "-c", *show], env=env, capture_output=True, text=True).stdout == str(repo)
    out = subprocess.run(["bash", "-c", *show], env=env | {"PYTHONPATH": "/site"}, capture_output=True, text=True)
    assert out.stdout == f"{repo}:/site" and out.stderr == ""


def test_a_job_name_or_folder_that_would_break_the_script_is_refused(tmp_path, capsys):
    launch = resolve_launch(LaunchSection(), {"cluster": "local"})
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"out_dir={tmp_path}"])
    cfg.name = "x\ntouch /tmp/pwned"
    with pytest.raises(UserError, match=r"name 'x\\ntouch /tmp/pwned': .* only letters, digits, _ \. -"):
        submit_chain([get("pretrain")], cfg, launch, [], dry_run=True)
    cfg.name, cfg.out_dir = "ok", str(tmp_path / "a\nb")
    with pytest.raises(UserError, match=r"out_dir .*a\\nb.*: a newline or control character"):
        submit_chain([get("pretrain")], cfg, launch, [], dry_run=True)
    assert capsys.readouterr().out == ""


SECRET_SETUP = ["launch.setup=[export WANDB_API_KEY=sekrit123, export DS_ACCELERATOR=cpu]"]


def test_dry_run_shows_setup_secrets_redacted(capsys):
    cfg = load_config(REPO / "configs" / "tiny.yaml", SECRET_SETUP)
    submit_chain([get("pretrain")], cfg, resolve_launch(cfg.launch, {"cluster": "local"}), [], dry_run=True)
    out = capsys.readouterr().out
    assert "export WANDB_API_KEY=<redacted>\n" in out and "export DS_ACCELERATOR=cpu\n" in out
    assert "sekrit123" not in out


@pytest.fixture
def sbatch(tmp_path, monkeypatch):
    """A stand-in ``sbatch`` on PATH: it keeps the script it was given (and its mode) in ``spool/``, outside the
    job folder, as slurmctld does, and accepts it as job 4242, or refuses it when ``$SBATCH_REFUSE`` is set."""
    bin_dir, spool = tmp_path / "bin", tmp_path / "spool"
    bin_dir.mkdir()
    spool.mkdir()
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\n"
        f'cp "$1" {spool}/script.sh && stat -c %a "$1" > {spool}/mode\n'
        'if [ -n "$SBATCH_REFUSE" ]; then echo "sbatch: error: invalid account" >&2; exit 1; fi\n'
        "echo 'Submitted batch job 4242'\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("MLFM_JOBS_INDEX", str(tmp_path / "jobs.jsonl"))
    return spool


def files_holding(text: str, *roots: Path) -> list[Path]:
    paths = [p for root in roots for p in ([root] if root.is_file() else root.rglob("*"))]
    return [p for p in paths if p.is_file() and text.encode() in p.read_bytes()]


def test_a_setup_secret_reaches_the_job_but_no_file_of_the_job_folder(tmp_path, sbatch):
    out = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*SECRET_SETUP, f"out_dir={out}", "data.prep.tokenizer=/tok"])
    assert submit(get("pretrain"), cfg, resolve_launch(cfg.launch, {"cluster": "local"}), []) == "4242"
    assert "\nexport WANDB_API_KEY=sekrit123\n" in (sbatch / "script.sh").read_text()  # what SLURM runs
    assert (sbatch / "mode").read_text().strip() == "600"  # owner-only until sbatch had read it
    assert files_holding("sekrit123", out, tmp_path / "jobs.jsonl") == []
    folder = out / "slurm" / "4242"
    assert "\nexport WANDB_API_KEY=<redacted>\n" in (folder / "4242_submission.sh").read_text()
    stored = load_config(folder / "config.yaml")
    assert stored.launch.setup == ["export WANDB_API_KEY=<redacted>", "export DS_ACCELERATOR=cpu"]
    assert stored.data.prep.tokenizer == "/tok" and stored.train.resume == "auto"


def test_a_refused_submission_leaves_no_secret_behind(tmp_path, sbatch, monkeypatch):
    monkeypatch.setenv("SBATCH_REFUSE", "1")
    out = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*SECRET_SETUP, f"out_dir={out}"])
    with pytest.raises(UserError, match="sbatch refused the pretrain job: .*invalid account"):
        submit(get("pretrain"), cfg, resolve_launch(cfg.launch, {"cluster": "local"}), [])
    assert files_holding("sekrit123", out) == []
