"""Samples during training: the scoring rule, and `mlfm train` logging sample validity under 2-process ZeRO-3."""
import json
import subprocess
import sys

import pytest

from mlfm_scale.sample.validation import score_sample
from tests.conftest import REPO

BASE = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.ffn_hidden_size=64",
        "model.time_embed_dim=16", "model.time_hidden_size=32", "data.seq_len=32", "train.steps=4",
        "train.micro_batch_size=4", "train.warmup_steps=2", "train.eval_every=100", "log.every=1",
        "log.plot_every=100", "checkpoint.every=100"]


def test_score_sample_scores_what_the_sampler_wrote():
    text = "ing from 3 : 3 4. Story of Mila. 2 plus 3 equals 5. The end of Mila's story."
    assert score_sample("", text) == (True, 1.0)  # the leading fragment of an unconditional sample is skipped
    assert score_sample("ing from 3 : 3", text) == (False, 0.75)  # ... but a prompted one is all scored
    assert score_sample("", "x. Story of Mila. The end of Omar's story.") == (False, 0.5)
    assert score_sample("", "x. no full stop here") == (False, 0.0)
    prompt = "Story of Mila. Mila flew"
    assert score_sample(prompt, prompt + " 12 3") == (False, 0.0)  # the prompt's own sentence earns nothing
    assert score_sample(prompt, prompt + " from Rome to Oslo. 1 plus 1 equals 2.") == (False, 0.5)
    assert score_sample(prompt, prompt + " from Santa Fe to Cape Town. The end of Mila's story.") == (True, 1.0)
    assert score_sample(prompt, prompt + " from Santa Fe to Cape Town. The end of Omar's story.") == (False, 0.5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_prep.shards import prepare_shards
    from data_prep.synth import write_synth_jsonl
    from mlfm_scale.config import PrepSection

    root = tmp_path_factory.mktemp("sample-data")
    write_synth_jsonl(root / "c.jsonl", 200, seed=3)
    prepare_shards([root / "c.jsonl"], root / "data", PrepSection(vocab_size=300, val_fraction=0.1,
                                                                 chunk_bytes=16384), 32, progress=False)
    return root / "data"


def train(out, shards, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "mlfm_scale.cli", "train", "configs/tiny.yaml", f"out_dir={out}", f"data.root={shards}", *BASE, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
def test_training_logs_sample_validity_without_disturbing_the_run(shards, tmp_path):
    rows = train(tmp_path / "with", shards, "sample.validation.every=2", "sample.validation.samples=2",
                 "sample.validation.steps=2", "sample.validation.length=8")
    logged = [r for r in rows if "sample_valid_rate" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r in logged:
        assert 0.0 <= r["sample_valid_rate"] <= r["sample_valid_sentences"] <= 1.0
        assert r["sample_nfe"] >= 3  # at least one round of 2 steps + 1
    samples = [json.loads(line) for line in (tmp_path / "with" / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompted"]) for s in samples] == [(2, False)] * 2 + [(2, True)] * 2 + [
        (4, False)] * 2 + [(4, True)] * 2
    assert all(s["text"].startswith("Story of ") for s in samples if s["prompted"])
    plain = train(tmp_path / "without", shards)
    losses = lambda rs: [r["loss"] for r in rs if "loss" in r]
    assert losses(rows) == losses(plain)  # sampling neither moves the weights nor the run's random state
