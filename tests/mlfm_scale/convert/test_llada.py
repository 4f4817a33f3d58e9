"""LLaDA → MLFM: separate q/k/v fused into megatron's per-group layout (grouped-query attention included); the
converted model (zero AdaLN modulation, TP = 1 and 2) gives LLaDA's logits; config.json is checked against the
model config, and unsupported variants, missing and unknown tensors are refused."""
import json

import pytest
import torch

from mlfm_scale.convert.formats import plan_for
from mlfm_scale.convert.plan import model_name
from mlfm_scale.errors import UserError
from mlfm_scale.model.mlfm import MLFMModel
from tests.distributed import run_distributed
from tests.mlfm_scale.convert.sources import (
    HEADS,
    LLADA_MASK,
    LLADA_THETA,
    LLADA_VOCAB,
    converted_logits,
    inputs,
    llada_config,
    llada_forward,
    llada_state,
    model_cfg,
    tp_worker,
    write,
)


def cfg_for(kv_heads: int = HEADS, **overrides):
    return model_cfg(kv_heads, rope_base=LLADA_THETA, **overrides)


def checkpoint(tmp_path, kv_heads: int = HEADS, shards: int = 2, **config):
    return write(llada_state(kv_heads), tmp_path, shards=shards, config=llada_config(kv_heads, **config))


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
def test_every_base_parameter_is_produced_with_its_shape(process_group, tmp_path, kv_heads):
    plan = plan_for("llada", cfg_for(kv_heads), checkpoint(tmp_path, kv_heads))
    model = MLFMModel(cfg_for(kv_heads), plan.vocab_size)
    base = {n: tuple(p.shape) for n, p in model.named_parameters()
            if "modulation" not in n and not n.startswith("gamma_embedding.")}
    assert {model_name(e.name): e.shape for e in plan.entries} == base
    for entry in plan.entries:
        t = entry.full()
        assert t.dtype == torch.float32 and tuple(t.shape) == entry.shape, entry.name
    assert (plan.vocab_size, plan.mask_id, plan.source_format) == (LLADA_VOCAB, LLADA_MASK, "llada")
    assert plan.notes["config"]["eos_token_id"] == 3


def test_qkv_is_fused_per_query_group(tmp_path):
    """4 query heads, 2 key/value heads of dim 8: rows [q0 q1 k0 v0 | q2 q3 k1 v1]."""
    state = llada_state(kv_heads=2)
    plan = plan_for("llada", cfg_for(2), write(state, tmp_path, config=llada_config(2)))
    qkv = next(e for e in plan.entries if e.name == "layers.1.self_attention.linear_qkv.weight").full()
    q, k, v = (state[f"model.transformer.blocks.1.{n}_proj.weight"].split(8) for n in "qkv")
    torch.testing.assert_close(qkv, torch.cat([q[0], q[1], k[0], v[0], q[2], q[3], k[1], v[1]]), rtol=0, atol=0)


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
def test_converted_model_gives_lladas_logits(process_group, tmp_path, kv_heads):
    state = llada_state(kv_heads)
    ids = inputs(LLADA_VOCAB)
    want = llada_forward(state, ids, kv_heads)
    path = write(state, tmp_path, shards=2, config=llada_config(kv_heads))
    for logits in converted_logits("llada", path, cfg_for(kv_heads), ids):
        assert (logits[..., :LLADA_VOCAB] - want).abs().max() <= 1e-5


@pytest.mark.multiprocess
def test_converted_model_gives_lladas_logits_at_tp2(tmp_path):
    state = llada_state(kv_heads=2)
    ids = inputs(LLADA_VOCAB)
    want = llada_forward(state, ids, kv_heads=2)
    path = write(state, tmp_path, shards=2, config=llada_config(2))
    rank0, rank1 = run_distributed(tp_worker, 2, "llada", path, cfg_for(2), ids)
    for a, b in zip(rank0, rank1):
        assert (a[..., :LLADA_VOCAB] - want).abs().max() <= 1e-5
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_config_json_is_checked_against_the_model_config(tmp_path):
    path = checkpoint(tmp_path)
    with pytest.raises(UserError) as e:
        plan_for("llada", model_cfg(num_layers=3, norm_eps=1e-6), path)  # and the default RoPE base 10000
    msg = str(e.value)
    assert "config.json has n_layers=2, but model.num_layers=3" in msg
    assert "config.json has rope_theta=500000, but model.rope_base=10000.0" in msg
    assert msg.endswith("set model.num_layers=2 model.rope_base=500000.0 model.norm_eps=1e-05")
    with pytest.raises(UserError, match=r"4 key/value heads \(n_kv_heads\), but model.num_query_groups=2"):
        plan_for("llada", cfg_for(2), path)
    with pytest.raises(UserError, match="model.vocab_size=60"):
        plan_for("llada", cfg_for(vocab_size=61), path)


def test_unsupported_variants_and_a_missing_config_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"block_type='sequential', weight_tying=True"):
        plan_for("llada", cfg_for(), checkpoint(tmp_path / "a", block_type="sequential", weight_tying=True))
    config = llada_config()
    del config["rope"]  # LLaDA's default is no RoPE
    with pytest.raises(UserError, match="rope=False"):
        plan_for("llada", cfg_for(), write(llada_state(), tmp_path / "b", config=config))
    with pytest.raises(UserError, match="no config.json"):
        plan_for("llada", cfg_for(), write(llada_state(), tmp_path / "c"))
    with pytest.raises(UserError, match="config.json lacks n_layers: not a LLaDA config"):
        plan_for("llada", cfg_for(), checkpoint(tmp_path / "d", n_layers=None))


def test_the_mask_id_defaults_to_lladas(tmp_path):
    config = llada_config()
    del config["mask_token_id"]
    with pytest.raises(UserError, match="mask_token_id 126336 is outside its 60-row embedding table"):
        plan_for("llada", cfg_for(), write(llada_state(), tmp_path, config=config))


def test_missing_unknown_and_foreign_tensors_are_refused(tmp_path):
    state = llada_state()
    del state["model.transformer.blocks.1.up_proj.weight"]
    with pytest.raises(UserError, match=r"blocks.1.up_proj.weight is not in .*missing"):
        plan_for("llada", cfg_for(), write(state, tmp_path / "missing", config=llada_config()))
    state = llada_state() | {"model.transformer.blocks.0.q_norm.weight": torch.ones(32)}
    with pytest.raises(UserError, match="tensors that LLaDA checkpoints do not have, e.g. .*blocks.0.q_norm"):
        plan_for("llada", cfg_for(), write(state, tmp_path / "qk-norm", config=llada_config()))
    from tests.mlfm_scale.convert.sources import smdm_state

    path = write(smdm_state(), tmp_path / "smdm", config=llada_config())
    with pytest.raises(UserError, match="is not a LLaDA checkpoint: it has no model.transformer.wte.weight"):
        plan_for("llada", cfg_for(), path)
    (path / "config.json").write_text(json.dumps([1]))
    with pytest.raises(UserError, match="not a JSON object"):
        plan_for("llada", cfg_for(), path)
