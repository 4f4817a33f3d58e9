"""The plain-PyTorch inference model against the megatron-core model it was exported from (TP = 1)."""
import json

import pytest
import torch

from mlfm_scale.config import Config
from mlfm_scale.errors import UserError
from mlfm_scale.export import export_config, export_tensors, write_safetensors
from mlfm_scale.inference import MLFMForInference
from mlfm_scale.train.universal import canonical_name, tp_partition
from tests.mlfm_scale.model.test_model import CFG, VOCAB, build, inputs, randomise_modulation

TOKENIZER = {"vocab_size": VOCAB, "mask_id": VOCAB - 1, "eos_id": 0, "pad_id": 1}


def export_model(model, out, dtype="fp32", max_shard_bytes=1 << 30, curve=None):
    cfg = Config(model=model.cfg)
    out.mkdir(exist_ok=True)
    full = {canonical_name(n): p.detach() for n, p in model.named_parameters()}
    tensors = export_tensors(full, VOCAB)
    write_safetensors(tensors, out, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], max_shard_bytes)
    client = {"objective": {"curve": curve}}
    config = export_config(cfg, TOKENIZER, client, tensors["embedding.weight"], out, "raw", dtype)
    (out / "config.json").write_text(json.dumps(config))


def test_logits_match_the_megatron_model(process_group, tmp_path):
    model = build()
    randomise_modulation(model)
    export_model(model, tmp_path, max_shard_bytes=20_000)  # sharded: several files and an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    inference = MLFMForInference.from_pretrained(tmp_path)
    z, gamma, ids = inputs()
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    for seg in (None, segments):
        want = model(z, gamma, seg)[..., :VOCAB]
        got = inference(z, gamma, seg)
        assert got.shape == (2, 12, VOCAB) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32, different kernels' reduction order
    torch.testing.assert_close(inference.embed(ids), model.embed(ids), rtol=0, atol=0)
    torch.testing.assert_close(inference.mask_embedding(), model.mask_embedding(VOCAB - 1), rtol=0, atol=0)
    assert inference.embedding_table().shape == (VOCAB, CFG.hidden_size)
    assert (inference.mask_id, inference.vocab_size, inference.sigma) == (VOCAB - 1, VOCAB, 0.2)


def test_bf16_export_and_schedule_with_the_learned_curve(process_group, tmp_path):
    from mlfm_scale.flow.schedules import active_curve_for, gamma_schedule_for

    model = build()
    curve = active_curve_for(Config().objective)
    curve.knots = torch.linspace(-10, 6, curve.quantiles, dtype=torch.float64) ** 3 / 100  # moved from uniform
    curve.knots = curve.knots.clamp(-10, 6)
    export_model(model, tmp_path, dtype="bf16", curve=curve.state_dict())
    inference = MLFMForInference.from_pretrained(tmp_path)
    assert inference.embedding.weight.dtype == torch.bfloat16
    z, gamma, _ = inputs()
    torch.testing.assert_close(inference(z, gamma), model(z, gamma)[..., :VOCAB], rtol=0.05, atol=0.1)
    q = torch.linspace(0.01, 0.99, 9, dtype=torch.float64)
    want = gamma_schedule_for(Config().objective, curve).icdf(q)
    torch.testing.assert_close(inference.gamma_schedule().icdf(q), want)
    fresh = gamma_schedule_for(Config().objective, active_curve_for(Config().objective))
    assert not torch.allclose(want, fresh.icdf(q))  # the learned curve is carried, not a fresh one


def test_tp_partition_table_matches_the_megatron_parameters(process_group):
    model = build()
    for name, p in model.named_parameters():
        want = (p.partition_dim, p.partition_stride) if getattr(p, "tensor_model_parallel", False) else None
        assert tp_partition(canonical_name(name)) == want, name


@pytest.mark.parametrize("time_mlp", ["shared", "per_layer"])
def test_flow_map_student_matches_the_megatron_model_for_any_jump_target(process_group, tmp_path, time_mlp):
    plain, model = (build(cfg=CFG.model_copy(update={"flow_map": on, "time_mlp": time_mlp})) for on in (False, True))
    for layers in (plain.decoder.layers, model.decoder.layers):  # strong enough that γ_t shows in the logits
        for layer in layers:
            torch.nn.init.normal_(layer.modulation.weight, std=0.5, generator=torch.Generator().manual_seed(5))
    z, gamma, _ = inputs()
    far, target = torch.tensor([-8.0, 5.0]), torch.tensor([-6.0, -1.0])
    teacher = plain(z, gamma)[..., :VOCAB]
    export_model(model, tmp_path / "fresh")
    fresh = MLFMForInference.from_pretrained(tmp_path / "fresh")
    assert fresh.flow_map
    # the target embedding starts at zero: a new student is the plain model (same seed), whatever γ_t
    torch.testing.assert_close(model(z, gamma, gamma_target=far)[..., :VOCAB], teacher, rtol=0, atol=0)
    torch.testing.assert_close(fresh(z, gamma, gamma_target=far), fresh(z, gamma), rtol=0, atol=0)
    torch.testing.assert_close(fresh(z, gamma, gamma_target=far), teacher, rtol=1e-5, atol=1e-5)
    torch.nn.init.normal_(model.target_gamma_embedding.mlp[2].weight, std=0.5,
                          generator=torch.Generator().manual_seed(2))
    export_model(model, tmp_path / "trained")
    trained = MLFMForInference.from_pretrained(tmp_path / "trained")
    want = model(z, gamma, gamma_target=target)[..., :VOCAB]
    assert (want - model(z, gamma)[..., :VOCAB]).abs().max() > 1e-4  # γ_t now matters, well beyond the tolerance
    torch.testing.assert_close(trained(z, gamma, gamma_target=target), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained(z, gamma), model(z, gamma)[..., :VOCAB], rtol=1e-5, atol=1e-5)  # γ_t = γ


def test_a_model_without_a_flow_map_refuses_a_jump_target(process_group, tmp_path):
    export_model(build(), tmp_path)
    inference = MLFMForInference.from_pretrained(tmp_path)
    z, gamma, _ = inputs()
    assert not inference.flow_map
    with pytest.raises(UserError, match="mlfm distill"):
        inference(z, gamma, gamma_target=gamma)
