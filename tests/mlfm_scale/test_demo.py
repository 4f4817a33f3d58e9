import argparse
import re

import pytest

from mlfm_scale.config import load_config
from mlfm_scale.demo import DEFAULT_CONFIG, MARKER, prepare_demo_dir, run
from mlfm_scale.errors import UserError


def config(out_dir, *overrides):
    return load_config(DEFAULT_CONFIG, [f"out_dir={out_dir}", *overrides])


def fill(out):
    """A finished run's leftovers in ``out``: checkpoints, metrics, shards, and a file of the user's."""
    for rel in ("checkpoints/latest", "metrics.jsonl", "data/manifest.json", "notes.txt"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("x")


def test_the_first_run_marks_its_new_out_dir_and_a_rerun_clears_only_its_run(tmp_path):
    out = tmp_path / "runs" / "demo"
    assert prepare_demo_dir(config(out)) == out and (out / MARKER).is_file()
    fill(out)
    prepare_demo_dir(config(out))
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert (out / "data" / "manifest.json").is_file() and (out / "notes.txt").is_file()  # data: prep replaces it


def test_an_empty_existing_out_dir_is_claimed(tmp_path):
    prepare_demo_dir(config(tmp_path))
    assert (tmp_path / MARKER).is_file()


def test_an_out_dir_the_demo_did_not_create_is_refused_untouched(tmp_path):
    fill(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    where = re.escape(str(tmp_path))
    with pytest.raises(UserError, match=rf"out_dir {where} was not created by `mlfm demo`.*choose another "
                       rf"out_dir.*or remove {where} yourself"):
        prepare_demo_dir(config(tmp_path))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("override", ["checkpoint.dir={elsewhere}", "data.root={elsewhere}", "checkpoint.dir=.",
                                      "data.root=../data"])
def test_paths_outside_the_demo_out_dir_are_refused(tmp_path, override):
    elsewhere = tmp_path / "elsewhere"
    fill(elsewhere)
    out = tmp_path / "demo"
    with pytest.raises(UserError, match="is not inside out_dir .* relative to out_dir"):
        prepare_demo_dir(config(out, override.format(elsewhere=elsewhere)))
    assert (elsewhere / "checkpoints" / "latest").is_file() and not out.exists()


def test_run_refuses_before_writing_anything(tmp_path):
    fill(tmp_path)
    args = argparse.Namespace(config=str(DEFAULT_CONFIG), nproc=2, resume_steps=1, overrides=[f"out_dir={tmp_path}"])
    with pytest.raises(UserError, match="not created by `mlfm demo`"):
        run(args)
    assert not (tmp_path / "corpus").exists() and (tmp_path / "checkpoints" / "latest").is_file()
