"""SMDM → MLFM: every base parameter is produced under its name and shape; the converted model (zero AdaLN
modulation, TP = 1 and 2) gives SMDM's logits; wrong configs and wrong files are refused with what to set."""
import pytest
import torch

from mlfm_scale.convert import smdm
from mlfm_scale.convert.formats import plan_for
from mlfm_scale.convert.plan import model_name
from mlfm_scale.errors import UserError
from mlfm_scale.model.mlfm import MLFMModel
from tests.distributed import run_distributed
from tests.mlfm_scale.convert.sources import (
    HEADS,
    SMDM_VOCAB,
    ShapesOnly,
    converted_logits,
    inputs,
    model_cfg,
    smdm_forward,
    smdm_shapes,
    smdm_state,
    tp_worker,
    write,
)


def test_every_base_parameter_is_produced_with_its_shape(process_group, tmp_path):
    plan = plan_for("smdm", model_cfg(), write(smdm_state(), tmp_path))
    model = MLFMModel(model_cfg(), plan.vocab_size)
    base = {n: tuple(p.shape) for n, p in model.named_parameters()
            if "modulation" not in n and not n.startswith("gamma_embedding.")}
    produced = {model_name(e.name): e.shape for e in plan.entries}
    assert produced == base
    for entry in plan.entries:
        t = entry.full()
        assert t.dtype == torch.float32 and tuple(t.shape) == entry.shape, entry.name
    assert (plan.vocab_size, plan.mask_id, plan.source_format) == (SMDM_VOCAB + 1, SMDM_VOCAB, "smdm")
    table = next(e for e in plan.entries if e.name == "embedding.weight").read()
    torch.testing.assert_close(table[SMDM_VOCAB], smdm_state()["transformer.wte.weight"][SMDM_VOCAB])  # the mask
    assert not next(e for e in plan.entries if e.name == "embedding.weight").full()[SMDM_VOCAB + 1:].any()


@pytest.mark.parametrize("groups", [HEADS, 2], ids=["mha", "gqa"])
def test_converted_model_gives_smdms_logits(process_group, tmp_path, groups):
    state = smdm_state(groups)
    ids = inputs(SMDM_VOCAB + 1)  # the mask token is an input like any other
    want = smdm_forward(state, ids, groups)
    for logits in converted_logits("smdm", write(state, tmp_path), model_cfg(groups), ids):
        assert (logits[..., :SMDM_VOCAB] - want).abs().max() <= 1e-5
        assert not logits[..., SMDM_VOCAB].any()  # SMDM has no mask logit: its output row is zero


@pytest.mark.multiprocess
def test_converted_model_gives_smdms_logits_at_tp2(tmp_path):
    state = smdm_state(groups=2)
    ids = inputs(SMDM_VOCAB + 1)
    want = smdm_forward(state, ids, groups=2)
    rank0, rank1 = run_distributed(tp_worker, 2, "smdm", write(state, tmp_path), model_cfg(2), ids)
    for a, b in zip(rank0, rank1):
        assert (a[..., :SMDM_VOCAB] - want).abs().max() <= 1e-5
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_config_of_another_shape_is_refused_naming_what_to_set(tmp_path):
    path = write(smdm_state(), tmp_path)
    with pytest.raises(UserError) as e:
        plan_for("smdm", model_cfg(num_layers=3, hidden_size=48, ffn_hidden_size=64), path)
    msg = str(e.value)
    assert "it has 2 layers (transformer.h.0–1), but model.num_layers=3" in msg
    assert "its width is 32" in msg and "model.hidden_size=48" in msg
    assert msg.endswith("set model.num_layers=2 model.hidden_size=32")  # every mismatch in one message
    with pytest.raises(UserError, match="model.num_query_groups=2"):
        plan_for("smdm", model_cfg(groups=4), write(smdm_state(groups=2), tmp_path / "gqa"))
    with pytest.raises(UserError, match="model.vocab_size=51"):
        plan_for("smdm", model_cfg(vocab_size=50), path)
    with pytest.raises(UserError, match="model.rope_base=10000.0"):
        plan_for("smdm", model_cfg(rope_base=5e5), path)


def test_a_published_shape_checks_the_head_count_and_names_our_config():
    """The head count does not show in an MHA checkpoint; SMDM's published shapes fix it."""
    source = ShapesOnly(smdm_shapes(groups=14, layers=20, d=1792, heads=14, ffn=7168, vocab=32000))
    cfg = model_cfg(groups=None).model_copy(update={"num_layers": 20, "hidden_size": 1792, "num_heads": 16,
                                                    "ffn_hidden_size": 7168})
    with pytest.raises(UserError) as e:
        smdm.plan(cfg, source)
    assert "Diff_LLaMA_1028M (this shape) has 14 heads, but model.num_heads=16" in str(e.value)
    assert str(e.value).endswith("set model.num_heads=14 model.num_query_groups=14, or use configs/smdm-1028m.yaml")
    plan = smdm.plan(cfg.model_copy(update={"num_heads": 14}), source)
    assert (plan.vocab_size, plan.mask_id, plan.notes["preset"]) == (32001, 32000, "Diff_LLaMA_1028M")
    assert plan.entries[0].shape == (32128, 1792)


def test_missing_unknown_and_misshapen_tensors_are_refused(tmp_path):
    state = smdm_state()
    del state["transformer.h.1.norm_2.weight"]
    with pytest.raises(UserError, match=r"transformer.h.1.norm_2.weight is not in .*missing"):
        plan_for("smdm", model_cfg(), write(state, tmp_path / "missing"))
    state = smdm_state() | {"transformer.h.0.attn.attn.bias": torch.zeros(96)}
    with pytest.raises(UserError, match=r"1 tensors that SMDM checkpoints do not have, e.g. transformer.h.0.attn.attn"):
        plan_for("smdm", model_cfg(), write(state, tmp_path / "bias"))
    state = smdm_state() | {"transformer.h.1.mlp.swiglu.w3.weight": torch.zeros(32, 48)}
    with pytest.raises(UserError, match=r"w3.weight in .*model.safetensors has shape \[32, 48\].*\[32, 64\]"):
        plan_for("smdm", model_cfg(), write(state, tmp_path / "ragged"))


def test_another_format_is_refused(tmp_path):
    from tests.mlfm_scale.convert.sources import llada_config, llada_state

    path = write(llada_state(), tmp_path, config=llada_config())
    with pytest.raises(UserError, match="is not an SMDM .* checkpoint: it has no transformer.wte.weight"):
        plan_for("smdm", model_cfg(), path)
    state = smdm_state() | {"lm_head.weight": torch.zeros(SMDM_VOCAB + 1, 32)}  # a table without a mask row
    with pytest.raises(UserError, match="plus one mask row"):
        plan_for("smdm", model_cfg(), write(state, tmp_path / "tied"))
