"""The megatron-core MLFM network: AdaLN, attention segments, recompute, vocab-parallel outputs, TP parity."""
import math

import pytest
import torch
import torch.nn.functional as F

from mlfm_scale.config import ModelSection, ParallelSection
from mlfm_scale.errors import UserError
from mlfm_scale.model.attention import AttentionSegments
from mlfm_scale.model.flops import flops_per_token, parameter_count
from mlfm_scale.model.mlfm import MLFMModel, padded_vocab_size
from tests.distributed import run_distributed

CFG = ModelSection(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, time_embed_dim=16,
                   time_hidden_size=24)
VOCAB = 50  # padded to 128: the padded logits must carry no mass


def build(cfg=CFG, seed=0, tp=1, **kw):
    return MLFMModel(cfg, VOCAB, tp=tp, seed=seed, **kw)  # each piece from (seed, piece): same for any TP size


def inputs(b=2, s=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, s, CFG.hidden_size, generator=g), torch.tensor([-3.0, 2.5])[:b],
            torch.randint(0, VOCAB, (b, s), generator=g))


def randomise_modulation(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    for layer in model.decoder.layers:
        torch.nn.init.normal_(layer.modulation.weight, std=0.05, generator=g)


def test_segments_positions_masks_and_cu_seqlens():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    sdpa = AttentionSegments.from_segment_ids(seg, "sdpa")
    assert sdpa.positions.tolist() == [[0, 1, 2, 0, 1, 0], list(range(6))]
    assert sdpa.mask.shape == (2, 1, 6, 6) and sdpa.mask[0, 0, 0, 3] and not sdpa.mask[0, 0, 3, 4]
    assert not sdpa.mask[1].any()
    flash = AttentionSegments.from_segment_ids(seg, "flash")
    assert flash.packed.cu_seqlens_q.tolist() == [0, 3, 5, 6, 12] and flash.packed.max_seqlen_q == 6
    assert AttentionSegments.from_segment_ids(torch.zeros(2, 6, dtype=torch.long), "sdpa").mask is None


def test_adaln_zero_init_equals_the_block_without_adaln(process_group):
    model = build()
    z, gamma, _ = inputs()
    out = model(z, gamma)
    # the same network with the conditioning removed: every layer a plain pre-norm megatron layer
    for layer in model.decoder.layers:
        assert torch.count_nonzero(layer.modulation.weight) == 0
    plain = model(z, torch.tensor([40.0, -40.0]))  # γ has no effect while the modulation is zero
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    from megatron.core.transformer.transformer_layer import TransformerLayer

    x = z.transpose(0, 1)
    from mlfm_scale.model.mlfm import rope_frequencies

    rope = rope_frequencies(torch.arange(z.size(1)).expand(z.size(0), -1), CFG.hidden_size // CFG.num_heads, 1e4)
    for layer in model.decoder.layers:
        x, _ = TransformerLayer.forward(layer, x, attention_mask=None, rotary_pos_emb=rope)
    ref, _ = model.output_layer(model.decoder.final_layernorm(x))
    torch.testing.assert_close(out[..., :VOCAB], ref.transpose(0, 1)[..., :VOCAB], rtol=1e-5, atol=1e-5)
    randomise_modulation(model)
    assert not torch.allclose(model(z, gamma), out)  # and the conditioning does act once trained


def test_document_restricted_attention_isolates_documents(process_group):
    model = build(cfg=CFG.model_copy(update={"attend_within_documents": True}))
    randomise_modulation(model)
    z, gamma, _ = inputs()
    seg = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    changed = z.clone()
    changed[0, 5:] += torch.randn(7, CFG.hidden_size)
    a, b = model(z, gamma, seg), model(changed, gamma, seg)
    torch.testing.assert_close(a[0, :5], b[0, :5], rtol=0, atol=1e-6)  # document 0 untouched by document 1
    assert not torch.allclose(a[0, 5:], b[0, 5:])
    full_a, full_b = model(z, gamma), model(changed, gamma)
    assert not torch.allclose(full_a[0, :5], full_b[0, :5])  # whole-block attention does see the change
    # RoPE restarts per document: a document alone at the block start == the same document after another
    shifted = torch.cat([z[:, 5:], z[:, :5]], dim=1)  # the 5-token document moved to positions 7..11
    seg2 = torch.tensor([[0] * 7 + [1] * 5] * 2)
    torch.testing.assert_close(model(z, gamma, seg)[0, :5], model(shifted, gamma, seg2)[0, 7:], rtol=1e-5, atol=1e-5)


def test_input_embedding_is_frozen_unless_asked(process_group):
    assert not build().embedding.weight.requires_grad
    assert build(cfg=CFG.model_copy(update={"freeze_embeddings": False})).embedding.weight.requires_grad


def test_initial_embedding_table_has_the_litgpt_scale(process_group):
    """MLFM.md, Noise geometry: σ and γ are tuned for a table of per-dimension std √(2/(5d)) (SMDM/LitGPT)."""
    from mlfm_scale.model.mlfm import embedding_square_sums

    wide = CFG.model_copy(update={"hidden_size": 256, "num_heads": 4})
    model = MLFMModel(wide, 4000)
    sums = embedding_square_sums(model, 4000)
    assert int(sums[1]) == 4000 * 256  # the real rows only, not the padding to 4096
    rms = float((sums[0] / sums[1]).sqrt())
    assert rms == pytest.approx(math.sqrt(2 / (5 * 256)), rel=0.01)
    unit = MLFMModel(wide.model_copy(update={"embedding_std": 1.0}), 4000)
    assert float(unit.embedding.weight.std()) == pytest.approx(1.0, rel=0.01)
    with pytest.raises(ValueError, match="embedding_std"):
        ModelSection(embedding_std=-1.0)


def test_model_takes_float32_z_under_bf16_compute(process_group):
    """The forward process hands over z in float32; a bf16 network casts it once, on entry."""
    model = build(dtype=torch.bfloat16).to(torch.bfloat16)  # as DeepSpeed's bf16 engine casts the whole module
    z, gamma, _ = inputs()
    logits = model(z, gamma)
    assert z.dtype == torch.float32 and logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())


def test_recompute_gives_identical_gradients(process_group):
    grads = []
    for recompute in (False, True):
        model = build(cfg=CFG.model_copy(update={"recompute": recompute}))
        randomise_modulation(model)
        z, gamma, targets = inputs()
        out = model.vocab_outputs(model(z, gamma), targets)
        (out.ce.mean() + out.x0_hat.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)


def test_vocab_outputs_match_full_softmax(process_group):
    model = build()
    z, gamma, targets = inputs()
    logits = model(z, gamma)
    assert logits.shape[-1] == padded_vocab_size(VOCAB, 1) == padded_vocab_size(VOCAB, 2) == 128
    out = model.vocab_outputs(logits, targets)
    real = logits[..., :VOCAB].double()
    table = model.embedding_table()[:VOCAB].double()
    probs = real.softmax(-1)
    torch.testing.assert_close(out.ce.double(), F.cross_entropy(real.transpose(1, 2), targets, reduction="none"))
    torch.testing.assert_close(out.x0_hat.double(), probs @ table, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.max_prob.double(), probs.max(-1).values)
    torch.testing.assert_close(out.entropy.double(), -(probs * probs.log()).sum(-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.correct.bool(), real.argmax(-1) == targets)
    confident = torch.full((1, 1, 128), -30.0)
    confident[..., 7] = 30.0
    x0 = model.vocab_outputs(confident, torch.tensor([[7]])).x0_hat[0, 0]
    torch.testing.assert_close(x0, model.embedding_table()[7], rtol=0, atol=1e-6)


def _tp_worker(tp: int) -> dict:
    """Build at ``tp`` from the same seed; one MLFM objective step (CE + x̂0 MSE, same corruption draws) →
    full logits, loss, x̂0 and gradients, TP shards gathered into TP=1 layout."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mlfm_scale.config import ObjectiveSection
    from mlfm_scale.data.batch import MicroBatch
    from mlfm_scale.parallel.state import model_parallel
    from mlfm_scale.train.objective import MLFMObjective

    with model_parallel(ParallelSection(tp=tp), seed=0):
        model = build(tp=tp)
        randomise_modulation(model)
        _, _, tokens = inputs()
        batch = MicroBatch(tokens=tokens, lengths=torch.tensor([12, 9]))
        objective = MLFMObjective(ObjectiveSection(mse_weight=1.0, crop_probability=0.0), mask_id=VOCAB - 1,
                                  special_ids=(0,))
        c = objective.corrupt(model, batch, torch.Generator().manual_seed(3))
        logits = model(c.z, c.gamma)
        loss, diag = objective.loss(model, logits, batch, c)
        loss.backward()
        x0 = model.vocab_outputs(logits.detach(), tokens).x0_hat

        def full(t, dim):
            if tp == 1 or dim is None:
                return t.detach().clone()
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
            return torch.cat(parts, dim)

        grads = {}
        for name, p in model.named_parameters():
            if p.requires_grad:  # the input embedding is frozen (MLFM.md)
                dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
                grads[name] = full(p.grad, dim)
        # fc1 holds [gate_r; up_r] per rank (megatron's stride 2): regroup into the TP=1 [gate; up] order.
        # QKV is laid out per head group, which TP slices contiguously: no regrouping needed.
        for name in [n for n in grads if n.endswith("linear_fc1.weight")] if tp > 1 else []:
            g = grads[name].view(tp, 2, -1, grads[name].size(-1))
            grads[name] = g.transpose(0, 1).reshape(-1, grads[name].size(-1))
        return {"logits": full(logits, -1), "loss": loss.detach(), "ce": diag["ce"], "x0": x0.detach(),
                "z": c.z.detach(), "grads": grads}


@pytest.mark.multiprocess
def test_tensor_parallel_matches_single_rank():
    tp1 = run_distributed(_tp_worker, 1, 1)[0]
    tp2 = run_distributed(_tp_worker, 2, 2)
    torch.testing.assert_close(tp2[0]["logits"], tp1["logits"], rtol=1e-5, atol=1e-5)
    for rank in tp2:
        torch.testing.assert_close(rank["loss"], tp1["loss"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rank["z"], tp1["z"], rtol=0, atol=0)  # identical corruption on every rank
        torch.testing.assert_close(rank["ce"], tp1["ce"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank["x0"], tp1["x0"], rtol=1e-5, atol=1e-6)
    assert tp2[0]["grads"].keys() == tp1["grads"].keys()
    for name, g in tp1["grads"].items():
        torch.testing.assert_close(tp2[0]["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_parameter_count_matches_the_model_and_flops_scale(process_group):
    net = build()
    assert parameter_count(CFG, padded_vocab_size(VOCAB, 1)) == sum(p.numel() for p in net.parameters())
    smdm = ModelSection(num_layers=20, hidden_size=1792, num_heads=14, ffn_hidden_size=7168)
    layers = 20 * (4 * 1792**2 + 3 * 1792 * 7168)
    assert round(layers / 1e6) == 1028  # SMDM "1028M" counts the transformer layers
    per_token = flops_per_token(smdm, 32001, 1024)
    assert 6 * layers < per_token < 6 * parameter_count(smdm, 32001) * 1.2
    assert flops_per_token(smdm, 32001, 1024, training=False) * 3 == per_token


def test_a_new_flow_map_student_is_exactly_its_teacher(process_group):
    teacher, student = build(), build(CFG.model_copy(update={"flow_map": True}))
    randomise_modulation(teacher)
    randomise_modulation(student)  # the same draws: the extra embedding takes its own seed
    z, gamma, _ = inputs()
    reference = teacher(z, gamma)
    for target in (gamma, torch.tensor([-6.0, -1.0])):
        assert float((student(z, gamma, gamma_target=target) - reference).detach().abs().max()) == 0.0
    torch.nn.init.normal_(student.target_gamma_embedding.mlp[2].weight, std=0.5)  # once trained, γ_t matters
    assert not torch.equal(student(z, gamma, gamma_target=torch.tensor([-6.0, -1.0])), reference)
    with pytest.raises(UserError, match="only a flow-map student"):
        teacher(z, gamma, gamma_target=gamma)
