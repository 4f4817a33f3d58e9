"""Which checkpoint a run resumes from (train.resume), and which one a rollback goes back to."""
import pytest

from mlfm_scale.train.checkpoint import STAGING, CheckpointError, describe, publish, tag_for
from mlfm_scale.train.manager import CheckpointManager, components


def save(ckpt, step, good=True):
    tag = tag_for(step)
    staged = ckpt / (tag + STAGING)
    staged.mkdir(parents=True)
    (staged / "weights.pt").write_bytes(b"x" * 64)
    publish(ckpt, tag, {"step": step, "good": good}, describe(staged, ["weights.pt"]), keep_last=10, keep_every=None)
    return ckpt / tag


def manager(ckpt):
    return CheckpointManager(None, ckpt, "hash", {}, keep_last=10, keep_every=None)


def test_a_new_run_is_refused_over_existing_checkpoints_unless_restarted(tmp_path):
    assert manager(tmp_path)._choose(None) is None  # nothing there: a new run
    save(tmp_path, 4)
    with pytest.raises(CheckpointError, match="already holds checkpoints .*train.resume=auto.*train.resume=restart"):
        manager(tmp_path)._choose(None)
    assert manager(tmp_path)._choose("restart") is None
    assert manager(tmp_path)._choose("auto") == (str(tmp_path), "step00000004")


@pytest.mark.parametrize("damage, problem, resumed", [
    (lambda ckpt: (ckpt / "latest").write_bytes(b"\xff\xfe garbage"), "cannot be read", 8),
    (lambda ckpt: (ckpt / "latest").write_text("step00000099"), "has no checkpoint.json", 8),
    (lambda ckpt: (ckpt / "latest").write_text("../../etc"), "is not a checkpoint tag", 8),
    (lambda ckpt: (ckpt / "step00000008" / "weights.pt").write_bytes(b"x" * 10), "has 10 bytes", 4),
    (lambda ckpt: (ckpt / "latest").unlink(), "missing", 8),
])
def test_auto_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, capsys, damage, problem, resumed):
    save(tmp_path, 4)
    save(tmp_path, 8)
    damage(tmp_path)
    assert manager(tmp_path)._choose("auto") == (str(tmp_path), tag_for(resumed))
    warning = capsys.readouterr().err
    assert f"WARNING: {tmp_path / 'latest'}" in warning and problem in warning


def test_auto_resume_never_starts_afresh_over_checkpoints_that_do_not_verify(tmp_path):
    tag = save(tmp_path, 4)
    (tag / "weights.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies; nothing to resume"):
        manager(tmp_path)._choose("auto")


def test_a_rollback_goes_to_the_newest_good_checkpoint_before_the_failure(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 4)
    save(tmp_path, 6, good=False)  # saved during a run of non-finite steps
    tag = save(tmp_path, 8)
    assert manager(tmp_path).last_good(before=7) == "step00000004"
    assert manager(tmp_path).last_good(before=9) == "step00000008"
    (tag / "weights.pt").write_bytes(b"")  # damaged: skipped
    assert manager(tmp_path).last_good(before=9) == "step00000004"
    assert manager(tmp_path).last_good(before=2) is None


def test_checkpoints_written_before_the_registry_still_load():
    legacy = {"state": {"step": 3}, "loader": {"epoch": 0}, "objective": {"curve": None}, "rng": {},
              "manifest_sha256": "h"}
    assert components(legacy) == {"counters": {"step": 3}, "loader": {"epoch": 0}, "objective": {"curve": None},
                                  "rng": {}, "decision": None}
