import subprocess

import pytest

from mlfm_scale.cli import COMMANDS
from tests.conftest import REPO


def run(cmd, *args):
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_top_level_help_lists_commands(mlfm_cmd):
    out = run(mlfm_cmd, "--help")
    assert out.returncode == 0 and all(name in out.stdout for name in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(mlfm_cmd, command):
    out = run(mlfm_cmd, command, "--help")
    assert out.returncode == 0 and f"mlfm {command}" in out.stdout


def test_config_prints_resolved_yaml_and_rejects_bad_keys(mlfm_cmd):
    out = run(mlfm_cmd, "config", "configs/tiny.yaml", "train.lr=2e-4")
    assert out.returncode == 0 and "lr: 0.0002" in out.stdout
    bad = run(mlfm_cmd, "config", "configs/tiny.yaml", "train.bogus=1")
    assert bad.returncode == 1 and "train.bogus: unknown key" in bad.stderr and "Traceback" not in bad.stderr


def test_unknown_command_fails(mlfm_cmd):
    assert run(mlfm_cmd, "nonsense").returncode == 2
