"""Shared fixtures: a small synthetic corpus and prep options sized for 2 CPU cores."""
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


@pytest.fixture
def mlfm_cmd() -> list[str]:
    """The installed console script's equivalent, runnable in a subprocess."""
    return [sys.executable, "-m", "mlfm_scale.cli"]
