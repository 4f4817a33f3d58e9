"""What a job runs, rendered without a cluster: the resolved config and the dry-run text."""
from launchers.kinds import KINDS, PIPELINE, get
from launchers.options import resolve_launch, sbatch_parameters
from launchers.submit import dry_run_text, job_config, submit_chain
from mlfm_scale.config import LaunchSection, load_config
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
