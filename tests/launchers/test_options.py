"""Launch options: profile ← config ← flags, one task per GPU, clear errors, the sbatch parameters."""
import pytest

from launchers.options import CLUSTERS, REPO, load_profile, resolve_launch, sbatch_parameters
from mlfm_scale.config import ConfigError, LaunchSection, load_config


def test_flags_override_the_config_which_overrides_the_profile():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["launch.cluster=local", "launch.time=00:10:00",
                                                       "launch.cpus_per_task=2"])
    launch = resolve_launch(cfg.launch, {"nodes": 2, "cpus_per_task": 1})
    assert launch.partition == "debug" and launch.mem == "4G"  # from configs/clusters/local.yaml
    assert launch.time == "00:10:00"  # the config beats the profile's 00:30:00
    assert launch.nodes == 2 and launch.cpus_per_task == 1  # flags beat both
    assert "export DS_ACCELERATOR=cpu" in launch.setup


def test_gpu_profile_runs_one_task_per_gpu():
    launch = resolve_launch(LaunchSection(), {"cluster": "example-gpu", "nodes": 4})
    assert launch.gpus_per_node == 8 and launch.tasks_per_node == 8
    with pytest.raises(ConfigError, match="one task per GPU"):
        resolve_launch(LaunchSection(), {"cluster": "example-gpu", "tasks_per_node": 2})


def test_bad_options_name_the_flag():
    with pytest.raises(ConfigError, match=r"nodes \(launch.nodes, --nodes\): Input should be greater than or equal"):
        resolve_launch(LaunchSection(), {"nodes": 0})
    with pytest.raises(ConfigError, match="unknown cluster profile 'nowhere'.*example-gpu, local"):
        resolve_launch(LaunchSection(), {"cluster": "nowhere"})
    with pytest.raises(ConfigError, match="'1h' is not a SLURM time"):
        resolve_launch(LaunchSection(), {"time": "1h"})


def test_sbatch_parameters():
    launch = resolve_launch(LaunchSection(), {"cluster": "example-gpu", "nodes": 4, "time": "1-00:00:30"})
    params = sbatch_parameters(launch, "mlfm-pretrain-x", ["12", "13"])
    assert params["time"] == 24 * 60 + 1 and params["nodes"] == 4 and params["ntasks_per_node"] == 8
    assert params["gpus_per_node"] == 8 and params["account"] == "my-project" and params["signal_delay_s"] == 300
    assert params["dependency"] == "afterok:12:13"
    assert params["additional_parameters"] == {"requeue": True, "mem": "0"}
    assert params["setup"][0].startswith(f"export PYTHONPATH={REPO}")
    assert "module load cuda/12.4 nccl" in params["setup"]
    cpu = sbatch_parameters(LaunchSection(), "j", [])
    assert "gpus_per_node" not in cpu and "dependency" not in cpu and "partition" not in cpu


@pytest.mark.parametrize("path", sorted(CLUSTERS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_cluster_profile_validates(path):
    assert load_profile(str(path))


@pytest.mark.parametrize("key, value", [
    ("partition", "debug\ntouch /tmp/pwned"), ("partition", "debug;id"), ("account", "my project"),
    ("qos", "$(id)"), ("constraint", "h100\n#"), ("constraint", "'h100'"), ("mem", "4G\nrm -rf ~"), ("mem", "lots"),
    ("time", "01:00:00\n"),
], ids=lambda v: repr(v))
def test_values_written_into_sbatch_lines_are_refused_outside_slurm_syntax(key, value):
    with pytest.raises(ConfigError, match=rf"{key} \(launch\.{key}, --{key}\): .*launch\.{key} may contain only"):
        resolve_launch(LaunchSection(), {key: value})


def test_slurm_syntax_is_accepted():
    launch = LaunchSection(partition="gpu,debug", account="my-project.x", qos="high_prio", mem="500M",
                           constraint="[rack1*2|rack2*4]&(a100|h100),ib:2", time="1-00:00")
    assert launch.constraint == "[rack1*2|rack2*4]&(a100|h100),ib:2"
    assert LaunchSection(mem="0").mem == "0" and LaunchSection(mem="64G").mem == "64G"
