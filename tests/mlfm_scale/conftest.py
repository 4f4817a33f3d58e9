"""Trained tiny checkpoints shared by the export and reshard tests (each run is seconds of 2-process training)."""
import pytest

from tests.mlfm_scale.train.test_training import train


@pytest.fixture(scope="session")
def tp2_run(tmp_path_factory, shards):
    """TP=2 × DP=1, ZeRO-3, 8 steps, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("tp2")
    train(out, shards, 2, "parallel.tp=2")
    return out


@pytest.fixture(scope="session")
def dp2_run(tmp_path_factory, shards):
    """TP=1 × DP=2, ZeRO-3, 8 steps, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("dp2")
    train(out, shards, 2)
    return out
