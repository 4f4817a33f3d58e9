"""The SFT stage end to end: prompt/response shards with the chat template, a run started from a pretraining
checkpoint's EMA weights, exact resume, and a clear error when the stage and the data disagree."""
import pytest

from tests.conftest import REPO, SMALL_MODEL
from tests.mlfm_scale.train.test_training import metrics, train

pytestmark = pytest.mark.multiprocess
SFT = [*SMALL_MODEL, "stage=sft", "data.seq_len=256", "objective.mse_weight=10",
       "objective.mixture_weights=[0.1,0.0,0.9]", "objective.active.mask_ratio_min=0.95", "sft.crop_multiple=64",
       "parallel.zero_stage=1"]  # the x̂0 term needs the whole embedding table


@pytest.fixture(scope="module")
def sft_shards(tmp_path_factory, shards):
    """SFT pairs ("Story of NAME." → the story) with the pretraining shards' tokenizer, 256-token blocks."""
    from data_prep.shards import prepare_shards
    from data_prep.synth import write_synth_jsonl
    from mlfm_scale.config import PrepSection

    root = tmp_path_factory.mktemp("sft-data")
    write_synth_jsonl(root / "sft.jsonl", 400, seed=3, sft=True)
    opts = PrepSection(format="sft", tokenizer=str(shards / "tokenizer"), chat_template="USER:\n{prompt}\nASSISTANT:\n",
                       val_fraction=0.2, chunk_bytes=16384)
    prepare_shards([root / "sft.jsonl"], root / "data", opts, 256, progress=False)
    return root / "data"


def test_sft_from_a_pretraining_ema_resumes_exactly(sft_shards, dp2_run, tmp_path):
    common = [*SFT, f"train.init_from={dp2_run / 'checkpoints'}", "train.init_weights=ema", "checkpoint.every=3",
              "train.eval_every=3", "train.schedule_steps=6"]  # the first part's LR horizon is the whole run's
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, sft_shards, 2, *common, "train.steps=6")
    train(split, sft_shards, 2, *common, "train.steps=3")
    result = train(split, sft_shards, 2, *common, "train.steps=6", "train.resume=auto")
    assert "initial weights" not in result.stderr  # a resumed run continues its own checkpoint
    losses, _ = metrics(straight)
    assert sorted(losses) == list(range(1, 7)) and metrics(split)[0] == losses


def test_the_stage_must_match_the_data(sft_shards, shards, tmp_path):
    result = train(tmp_path / "a", sft_shards, 1, *SMALL_MODEL, "data.seq_len=256", "train.steps=1", check=False)
    assert result.returncode != 0 and "stage=pretrain, but the data" in result.stderr
    assert "set stage=sft" in result.stderr
    result = train(tmp_path / "b", shards, 1, *SMALL_MODEL, "stage=sft", "train.steps=1", check=False)
    assert result.returncode != 0 and "set stage=pretrain" in result.stderr


def test_launch_sft_is_registered_and_refuses_a_pretraining_config():
    from launchers.kinds import get
    from mlfm_scale.config import load_config
    from mlfm_scale.errors import UserError

    kind = get("sft")
    assert kind.preemptible
    with pytest.raises(UserError, match="set stage=sft"):
        kind.load()(load_config(REPO / "configs" / "tiny.yaml"))
