"""LoRA adapters on the megatron-core model: zero-init equality, merge parity, TP = 2 against TP = 1."""
import pytest
import torch

from mlfm_scale.config import LoRASection, ModelSection, ParallelSection
from mlfm_scale.model import lora
from mlfm_scale.model.common import merge_adapters
from mlfm_scale.model.mlfm import MLFMModel
from mlfm_scale.train.universal import split_tp
from tests.distributed import run_distributed
from tests.mlfm_scale.model.test_model import CFG, VOCAB, inputs, randomise_modulation

LORA = CFG.model_copy(update={"lora": LoRASection(rank=4, alpha=8.0, output_rank=2, output_alpha=4.0),
                              "num_heads": 4, "num_query_groups": 2})


def randomise_adapters(model, tp=1, tp_rank=0):
    """Random B (this rank's shard of one full draw per adapter, so every TP size holds the same adapters)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if name.endswith("lora.b"):
                sharded = getattr(p, "tensor_model_parallel", False)
                shape = list(p.shape)
                if sharded:
                    shape[p.partition_dim] *= tp
                full = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.1
                p.copy_(split_tp(full, (p.partition_dim, 1) if sharded else None, tp, tp_rank))


def test_adapters_start_as_the_base(process_group):
    z, gamma, _ = inputs()
    base = MLFMModel(LORA.model_copy(update={"lora": LoRASection()}), VOCAB, seed=0)
    adapted = MLFMModel(LORA, VOCAB, seed=0)
    assert {n for n, _ in adapted.named_parameters()} - {n for n, _ in base.named_parameters()} == {
        f"decoder.layers.{i}.{path}.lora.{ab}" for i in range(CFG.num_layers) for path, _ in lora.TARGETS.values()
        for ab in "ab"} | {"output_layer.lora.a", "output_layer.lora.b"}
    for layer in (base, adapted):
        randomise_modulation(layer)
    torch.testing.assert_close(adapted(z, gamma), base(z, gamma), rtol=0, atol=0)


def test_merged_weights_give_the_adapted_model(process_group):
    z, gamma, _ = inputs()
    adapted = MLFMModel(LORA, VOCAB, seed=0)
    randomise_adapters(adapted)
    plain = MLFMModel(LORA.model_copy(update={"lora": LoRASection()}), VOCAB, seed=0)
    state = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    merge_adapters(state, state, LORA.lora)
    plain.load_state_dict(state, strict=False)
    assert not {n for n, _ in plain.named_parameters()} - set(state)
    assert not torch.equal(adapted(z, gamma), MLFMModel(LORA, VOCAB, seed=0)(z, gamma))  # the adapters act
    torch.testing.assert_close(plain(z, gamma), adapted(z, gamma), rtol=1e-5, atol=1e-5)


def test_dropout_is_refused_under_tensor_parallelism():
    with pytest.raises(RuntimeError, match="UserError: model.lora.dropout > 0 needs parallel.tp=1"):
        run_distributed(_build_with_dropout, 2)


def _build_with_dropout():
    from mlfm_scale.parallel.state import model_parallel

    with model_parallel(ParallelSection(tp=2), seed=0):
        MLFMModel(LORA.model_copy(update={"lora": LoRASection(rank=2, dropout=0.1)}), VOCAB, tp=2)


def _tp_worker(tp: int) -> dict:
    """Adapted model at ``tp`` (random B, random modulation): full logits and the adapters' gradients of a
    logits loss, TP shards gathered into the TP = 1 layout."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mlfm_scale.parallel.state import model_parallel

    with model_parallel(ParallelSection(tp=tp), seed=0):
        model = MLFMModel(LORA, VOCAB, tp=tp, seed=0)
        randomise_modulation(model)
        randomise_adapters(model, tp, ps.get_tensor_model_parallel_rank())
        z, gamma, _ = inputs()
        logits = model(z, gamma)
        real = logits[..., : max(0, VOCAB - model.vocab_start)]  # this rank's real-vocabulary logits
        (real.float().square().sum() * 1e-2).backward()  # summed over ranks: the TP = 1 loss

        def full_of(t, p):
            if tp == 1 or not getattr(p, "tensor_model_parallel", False):
                return t.detach().clone()
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
            return torch.cat(parts, p.partition_dim)

        logits_parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(logits_parts, logits.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
        return {"logits": torch.cat(logits_parts, -1),
                "grads": {n: full_of(p.grad, p) for n, p in model.named_parameters() if ".lora." in n}}


@pytest.mark.multiprocess
def test_tensor_parallel_adapters_match_single_rank():
    tp1 = run_distributed(_tp_worker, 1, 1)[0]
    tp2 = run_distributed(_tp_worker, 2, 2)[0]
    torch.testing.assert_close(tp2["logits"], tp1["logits"], rtol=1e-5, atol=1e-5)
    assert tp2["grads"].keys() == tp1["grads"].keys() and tp1["grads"]
    for name, g in tp1["grads"].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(tp2["grads"][name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_grouped_query_attention_config_is_checked():
    with pytest.raises(ValueError, match="num_query_groups"):
        ModelSection(num_heads=4, num_query_groups=3, hidden_size=32)
