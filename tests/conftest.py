"""Shared fixtures: a small synthetic corpus, shards for training runs, a 2-layer d=32 model's overrides."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    from data_prep.synth import write_synth_jsonl

    path = tmp_path_factory.mktemp("corpus") / "synth.jsonl"
    write_synth_jsonl(path, 600, seed=1)
    return path


# A 2-layer d=32 model on 32-token blocks (the `shards` below): multi-process training runs in seconds.
SMALL_MODEL = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.ffn_hidden_size=64",
               "model.time_embed_dim=16", "model.time_hidden_size=32", "data.seq_len=32"]


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Prepared shards of a 400-document synthetic corpus: 32-token blocks, BPE vocabulary 300."""
    from data_prep.shards import prepare_shards
    from data_prep.synth import write_synth_jsonl
    from mlfm_scale.config import PrepSection

    root = tmp_path_factory.mktemp("train-data")
    write_synth_jsonl(root / "c.jsonl", 400, seed=2)
    prepare_shards([root / "c.jsonl"], root / "data", PrepSection(vocab_size=300, val_fraction=0.1,
                                                                 chunk_bytes=16384), 32, progress=False)
    return root / "data"


@pytest.fixture
def mlfm_cmd() -> list[str]:
    """The installed console script's equivalent, runnable in a subprocess."""
    return [sys.executable, "-m", "mlfm_scale.cli"]


@pytest.fixture(scope="session")
def process_group():
    """A one-process gloo group with megatron parallel_state at tp = pp = 1, for single-process model tests."""
    import torch.distributed as dist

    from mlfm_scale.config import ParallelSection
    from mlfm_scale.parallel.state import init_model_parallel
    from tests.distributed import free_port

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    init_model_parallel(ParallelSection(tp=1, pp=1), seed=0)
    yield
