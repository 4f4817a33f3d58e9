"""Samples during training: the scoring rule, and `mlfm train` logging sample validity under 2-process ZeRO-3."""
import json

import pytest

from mlfm_scale.sample.validation import score_sample
from tests.mlfm_scale.train.test_training import metrics, train


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


def test_in_training_samples_refuse_tensor_parallel_runs():
    from mlfm_scale.config import Config
    from mlfm_scale.errors import UserError
    from mlfm_scale.sample.validation import TrainingSamples

    with pytest.raises(UserError, match="needs parallel.tp=1"):
        TrainingSamples(Config(parallel={"tp": 2}), model=None, objective=None, manifest={}, rank=0)


@pytest.mark.multiprocess
def test_training_logs_sample_validity_without_disturbing_the_run(shards, dp2_run, tmp_path):
    out = tmp_path / "sampled"
    train(out, shards, 2, "sample.validation.every=4", "sample.validation.samples=2",
          "sample.validation.steps=2", "sample.validation.length=8")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "sample_valid_rate" in r]
    assert [r["step"] for r in logged] == [4, 8]
    for r in logged:
        assert 0.0 <= r["sample_valid_rate"] <= r["sample_valid_sentences"] <= 1.0
        assert r["sample_nfe"] >= 3  # at least one round of 2 steps + 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompted"]) for s in samples] == [(4, False)] * 2 + [(4, True)] * 2 + [
        (8, False)] * 2 + [(8, True)] * 2
    assert all(s["text"].startswith("Story of ") for s in samples if s["prompted"])
    # the same run without samples (tests/mlfm_scale/conftest.py): sampling moves neither weights nor random state
    assert metrics(out)[0] == metrics(dp2_run)[0]
