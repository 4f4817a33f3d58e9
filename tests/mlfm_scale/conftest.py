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


# A pipeline run's settings: ZeRO-1, 4 micro-batches per step; crops change the sequence length between
# micro-batches (DeepSpeed's dynamic shapes) and the γ curve moves every 2 steps.
PIPELINE = ("parallel.zero_stage=1", "train.grad_accum=4", "train.micro_batch_size=2",
            "objective.crop_probability=0.3", "objective.active.update_every=2")


@pytest.fixture(scope="session")
def pp2_run(tmp_path_factory, shards):
    """PP=2 (two processes, one layer per stage), ZeRO-1, 8 steps, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("pp2")
    train(out, shards, 2, *PIPELINE, "parallel.pp=2")
    return out
