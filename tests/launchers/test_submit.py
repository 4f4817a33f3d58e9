"""What a job runs, rendered without a cluster: the resolved config, the dry-run text, what a submission
(to a stand-in ``sbatch``) leaves in the job folder."""
import os
import subprocess
from pathlib import Path

import pytest

from launchers import options
from launchers.kinds import KINDS, PIPELINE, get
from launchers.options import resolve_launch, sbatch_parameters
from launchers.submit import dry_run_text, job_config, submit, submit_chain
from mlfm_scale.config import LaunchSection, load_config
from mlfm_scale.errors import UserError
from tests.conftest import REPO


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
