"""`mlfm convert` end to end: a LLaDA checkpoint → a step-0 checkpoint that exports to the source's logits,
trains with LoRA at TP = 2 from it (base and embeddings bitwise unchanged), and exports merged or as adapters."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mlfm_scale.inference import MLFMForInference
from tests.conftest import REPO, SMALL_MODEL
from tests.mlfm_scale.convert.sources import LLADA_THETA, inputs, llada_config, llada_forward, llada_state, write
from tests.mlfm_scale.train.test_training import train

pytestmark = pytest.mark.multiprocess
GROUPS = 2
MODEL = [*SMALL_MODEL, f"model.num_query_groups={GROUPS}", f"model.rope_base={LLADA_THETA}"]
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.output_rank=2", "model.lora.output_alpha=2"]


def mlfm(*args):
    result = subprocess.run([sys.executable, "-m", "mlfm_scale.cli", *map(str, args)], capture_output=True,
                            text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shards):
    """A tiny LLaDA (grouped-query) with the shards' vocabulary and mask id, converted with LoRA configured."""
    tok = json.loads((shards / "manifest.json").read_text())["tokenizer"]
    root = tmp_path_factory.mktemp("llada")
    state = llada_state(GROUPS, vocab=tok["vocab_size"])
    src = write(state, root / "src", shards=2,
                config=llada_config(GROUPS, vocab_size=tok["vocab_size"], embedding_size=tok["vocab_size"],
                                    mask_token_id=tok["mask_id"]))
    out = mlfm("convert", "llada", src, root / "converted", "--config", "configs/tiny.yaml", f"data.root={shards}",
               *MODEL, *LORA)
    assert "checked against the data's tokenizer" in out
    return {"state": state, "checkpoint": root / "converted", "root": root, "vocab": tok["vocab_size"]}


def export_logits(export, ids, adapters=None):
    model = MLFMForInference.from_pretrained(export, adapters=adapters)
    with torch.no_grad():
        return model(model.embed(ids), torch.tensor([-3.0, 2.0]))


def test_the_converted_checkpoint_exports_to_the_source_model(converted):
    export = converted["root"] / "export"
    mlfm("export", converted["checkpoint"], export)
    ids = inputs(converted["vocab"])
    want = llada_forward(converted["state"], ids, GROUPS)
    assert (export_logits(export, ids) - want).abs().max() <= 1e-5
    assert json.loads((export / "config.json").read_text())["merged_lora"]["rank"] == 4


def test_a_converted_checkpoint_is_a_start_not_a_resume(converted, shards, tmp_path):
    result = train(tmp_path / "run", shards, 1, *MODEL, *LORA, f"train.resume={converted['checkpoint']}", check=False)
    assert result.returncode != 0 and f"train.init_from={converted['checkpoint']}" in result.stderr


def test_a_pipeline_run_starts_from_it(converted, shards, tmp_path):
    """PP = 2 × ZeRO-1: each stage loads its own layers (the source's other layers are not 'extra')."""
    run = tmp_path / "pp"
    result = train(run, shards, 2, *MODEL, *LORA, "parallel.pp=2", "parallel.zero_stage=1", "train.grad_accum=2",
                   f"train.init_from={converted['checkpoint']}", "train.steps=2", "checkpoint.every=2")
    assert "initial weights (param)" in result.stderr
    mlfm("reshard", run / "checkpoints")
    start = load_file(converted["checkpoint"] / "step00000000" / "universal" / "param.safetensors")
    after = load_file(run / "checkpoints" / "step00000002" / "universal" / "param.safetensors")
    assert after.keys() == start.keys()
    assert all(torch.equal(after[n], t) for n, t in start.items() if ".lora." not in n and "modulation" not in n
               and "gamma_embedding" not in n)


def test_lora_training_from_it_keeps_the_base_and_exports_merged_or_as_adapters(converted, shards, tmp_path):
    run = tmp_path / "run"
    train(run, shards, 2, *MODEL, *LORA, "parallel.tp=2", f"train.init_from={converted['checkpoint']}",
          "train.steps=4", "checkpoint.every=4", "train.lora_lr=0.01", "train.adaln_lr=0.01")
    start = load_file(converted["checkpoint"] / "step00000000" / "universal" / "param.safetensors")
    mlfm("reshard", run / "checkpoints")
    after = load_file(run / "checkpoints" / "step00000004" / "universal" / "param.safetensors")
    assert after.keys() == start.keys()
    for name, t in start.items():
        trained = ".lora." in name or "modulation" in name or "gamma_embedding" in name
        if not trained:
            assert torch.equal(after[name], t), f"{name} moved: the base and the embeddings are frozen"
        elif name.endswith("lora.b") or "modulation" in name:
            assert not torch.equal(after[name], t), f"{name} did not train"
    state = torch.load(run / "checkpoints" / "step00000004" / "universal" / "state.pt", weights_only=False)
    origin = state["client"]["components"]["origin"]
    assert origin["init_from"] == str(converted["checkpoint"] / "step00000000") and origin["weights"] == "param"

    ids = inputs(converted["vocab"])
    merged, adapters, base = tmp_path / "merged", tmp_path / "adapters", converted["root"] / "base"
    mlfm("export", run / "checkpoints", merged, "--merge-lora", "--weights", "raw")
    mlfm("export", run / "checkpoints", adapters, "--adapters-only", "--weights", "raw")
    mlfm("export", converted["checkpoint"], base)
    assert sorted(p.name for p in adapters.iterdir()) == ["adapter_config.json", "adapters.safetensors",
                                                          "generation_config.json", "tokenizer.json"]
    assert all(".lora." in n or "modulation" in n or "gamma_embedding" in n
               for n in load_file(adapters / "adapters.safetensors"))
    reference = unmerged_logits(after, run, ids, converted["vocab"])
    assert (export_logits(merged, ids) - reference).abs().max() <= 1e-5
    assert (export_logits(base, ids, adapters=adapters) - reference).abs().max() <= 1e-5
    settings = json.loads((adapters / "generation_config.json").read_text()) | {"steps": 7}  # the run's own
    (adapters / "generation_config.json").write_text(json.dumps(settings))
    assert MLFMForInference.from_pretrained(base, adapters=adapters).generation_config == settings


def unmerged_logits(params, run, ids, vocab):
    """The trained adapted network itself (megatron model, TP = 1, adapters unmerged) on the canonical weights."""
    from mlfm_scale.config import Config
    from tests.distributed import run_distributed

    state = torch.load(run / "checkpoints" / "step00000004" / "universal" / "state.pt", weights_only=False)
    cfg = Config.model_validate(state["client"]["config"])
    return run_distributed(_logits_worker, 1, cfg.model, params, ids, vocab)[0]


def _logits_worker(model_cfg, params, ids, vocab):
    from mlfm_scale.config import ParallelSection
    from mlfm_scale.convert.plan import model_name
    from mlfm_scale.model.mlfm import MLFMModel
    from mlfm_scale.parallel.state import model_parallel

    with model_parallel(ParallelSection(tp=1), seed=0):
        model = MLFMModel(model_cfg, vocab, seed=0)
        missing, unexpected = model.load_state_dict({model_name(n): t for n, t in params.items()}, strict=False)
        assert not unexpected and all("extra_state" in n for n in missing), (missing, unexpected)
        with torch.no_grad():
            return model(model.embed(ids), torch.tensor([-3.0, 2.0]))[..., :vocab]
