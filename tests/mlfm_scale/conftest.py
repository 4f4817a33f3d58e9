"""Trained tiny checkpoints shared by the export and reshard tests (each run is seconds of 2-process training)."""
import pytest

from tests.mlfm_scale.train.test_training import train


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """32-token shards of a small synthetic corpus (as test_training's)."""
    from data_prep.shards import prepare_shards
    from data_prep.synth import write_synth_jsonl
    from mlfm_scale.config import PrepSection

    root = tmp_path_factory.mktemp("reshard-data")
    write_synth_jsonl(root / "c.jsonl", 400, seed=2)
    prepare_shards([root / "c.jsonl"], root / "data", PrepSection(vocab_size=300, val_fraction=0.1,
                                                                 chunk_bytes=16384), 32, progress=False)
    return root / "data"


@pytest.fixture(scope="session")
def tp2_run(tmp_path_factory, small_shards):
    """TP=2 × DP=1, ZeRO-3, 8 steps, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("tp2")
    train(out, small_shards, 2, "parallel.tp=2")
    return out


@pytest.fixture(scope="session")
def dp2_run(tmp_path_factory, small_shards):
    """TP=1 × DP=2, ZeRO-3, 8 steps, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("dp2")
    train(out, small_shards, 2)
    return out
