import pytest

from mlfm_scale.train.checkpoint import (
    STAGING,
    CheckpointError,
    describe,
    newest_verified,
    publish,
    recover,
    resolve,
    tag_for,
    verify,
)


def make(ckpt, step, content=b"x" * 100):
    """Save step ``step`` the way every rank's save does: into the staging directory, then publish."""
    tag = tag_for(step)
    staged = ckpt / (tag + STAGING)
    staged.mkdir(parents=True)
    (staged / "weights.pt").write_bytes(content)
    publish(ckpt, tag, {"step": step}, describe(staged, ["weights.pt"]), keep_last=2, keep_every=10)
    return tag


def test_publish_verify_latest_and_retention(tmp_path):
    for step in (5, 10, 15, 20, 25):
        make(tmp_path, step)
    assert (tmp_path / "latest").read_text() == "step00000025"
    kept = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert kept == ["step00000010", "step00000020", "step00000025"]  # newest two, plus every 10th
    assert verify(tmp_path / "step00000025")["step"] == 25
    assert resolve(str(tmp_path)) == (tmp_path, "step00000025")
    assert resolve(str(tmp_path / "step00000010")) == (tmp_path, "step00000010")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "weights.pt").write_bytes(b"x" * 99), "has 99 bytes, the manifest says 100"),
    (lambda d: (d / "weights.pt").write_bytes(b"y" * 100), "does not match its sha256"),
    (lambda d: (d / "weights.pt").unlink(), "weights.pt is missing"),
    (lambda d: (d / "checkpoint.json").unlink(), "has no checkpoint.json"),
])
def test_damaged_checkpoints_are_refused(tmp_path, damage, message):
    tag = make(tmp_path, 3)
    damage(tmp_path / tag)
    with pytest.raises(CheckpointError, match=message):
        verify(tmp_path / tag)


def test_retention_leaves_newer_timelines_and_drops_older_incomplete_tags(tmp_path):
    make(tmp_path, 30)  # an abandoned timeline's newer checkpoint
    (tmp_path / "step00000004").mkdir()  # an interrupted save: no manifest
    for step in (5, 6, 7):
        make(tmp_path, step)
    assert (tmp_path / "latest").read_text() == "step00000007"
    kept = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert kept == ["step00000006", "step00000007", "step00000030"]


def test_resume_path_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        resolve(str(tmp_path))


def test_a_resaved_tag_starts_empty(tmp_path):
    """Nothing of an earlier save of a tag (here, its layout-free form) survives a new save of it."""
    tag = make(tmp_path, 5)
    (tmp_path / tag / "universal").mkdir()
    (tmp_path / tag / "universal" / "param.safetensors").write_bytes(b"stale")
    make(tmp_path, 5, content=b"z" * 100)
    assert not (tmp_path / tag / "universal").exists()
    assert (tmp_path / tag / "weights.pt").read_bytes() == b"z" * 100 and verify(tmp_path / tag)["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", tag]


def test_an_unfinished_save_leaves_the_published_checkpoints_alone(tmp_path):
    make(tmp_path, 5)
    staged = tmp_path / (tag_for(10) + STAGING)  # a save killed before rank 0 published it
    staged.mkdir()
    (staged / "weights.pt").write_bytes(b"partial")
    assert resolve(str(tmp_path)) == (tmp_path, "step00000005") and verify(tmp_path / "step00000005")
    assert newest_verified(tmp_path) == "step00000005"


def test_retention_keeps_the_newest_good_checkpoint_for_a_rollback(tmp_path):
    make(tmp_path, 2)
    for step in (4, 6, 8):  # saved during a run of non-finite steps
        tag = tag_for(step)
        (tmp_path / (tag + STAGING)).mkdir()
        (tmp_path / (tag + STAGING) / "weights.pt").write_bytes(b"x")
        publish(tmp_path, tag, {"step": step, "good": False}, describe(tmp_path / (tag + STAGING), ["weights.pt"]),
                keep_last=2, keep_every=None)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step00000002", "step00000006",
                                                                       "step00000008"]


def test_recover_tidies_what_killed_saves_left(tmp_path):
    make(tmp_path, 5)
    (tmp_path / "step00000010.tmp").mkdir()  # killed while writing
    (tmp_path / "step00000005").rename(tmp_path / "step00000005.old")  # killed between a re-save's renames
    lines = recover(tmp_path)
    assert len(lines) == 2 and verify(tmp_path / "step00000005")["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000005"]
