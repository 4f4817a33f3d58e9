"""The reference's MLFM checkpoints (LoRA + DiT AdaLN on SMDM) → MLFM: the converted model gives the reference
model's logits at any γ, from an adapters-only checkpoint with its SMDM base beside it and from a full-model one;
the EMA weights by default; runs our layers do not compute, configs that differ and missing bases are refused."""
import math

import pytest
import torch
import torch.nn.functional as F

from mlfm_scale.convert import reference
from mlfm_scale.convert.formats import plan_for
from mlfm_scale.convert.plan import model_name
from mlfm_scale.errors import UserError
from mlfm_scale.model.mlfm import MLFMModel
from tests.mlfm_scale.convert.sources import (
    FFN,
    HEADS,
    LAYERS,
    SMDM_VOCAB,
    WIDTH,
    attention,
    inputs,
    model_cfg,
    rms_norm,
    smdm_state,
    write,
)

RANK, ALPHA, OUT_RANK, OUT_ALPHA = 4, 12.0, 2, 5.0  # scales 3 and 2.5: a swapped α shows
EMBED, HIDDEN = 16, 24  # model_cfg's time_embed_dim and time_hidden_size
BLOCK = "model.transformer.h."
SITES = {"attn.attn": (WIDTH, 3 * WIDTH), "attn.proj": (WIDTH, WIDTH), "mlp.swiglu.w1": (WIDTH, FFN),
         "mlp.swiglu.w2": (WIDTH, FFN), "mlp.swiglu.w3": (FFN, WIDTH)}  # (in, out)
GAMMAS = (torch.tensor([-9.0, -3.0]), torch.tensor([0.5, 0.5]), torch.tensor([5.5, -1.0]))  # γ per sample


def cfg(**lora):
    """Our model at the fixtures' shape, with the reference's conditioning and adapters."""
    return model_cfg(time_mlp="per_layer", lora={"rank": RANK, "alpha": ALPHA, "output_rank": OUT_RANK,
                                                 "output_alpha": OUT_ALPHA} | lora)


def ref_config(**overrides) -> dict:
    """The checkpoint's `config`, as the reference's runner saves it (the options that matter here)."""
    return {"smdm_size": 1028, "adaln": True, "adaln_mode": "dit", "adaln_time_embed_dim": EMBED,
            "adaln_hidden_dim": HIDDEN, "time_conditioning": "gamma", "lora_rank": RANK, "lora_alpha": ALPHA,
            "lora_dropout": 0.05, "lora_target_modules": ["attn", "proj", "w1", "w2", "w3"],
            "lora_output_head": True, "lora_output_rank": OUT_RANK, "lora_output_alpha": OUT_ALPHA,
            "lora_output_tied_policy": "output_delta", "save_full_model": False} | overrides


def adapters(seed: int) -> dict[str, torch.Tensor]:
    """The adapter tensors under the reference's names, all nonzero (B and the modulation included)."""
    shapes = {"output_lora.lora_a.weight": (OUT_RANK, WIDTH), "output_lora.lora_b.weight": (SMDM_VOCAB, OUT_RANK)}
    for i in range(LAYERS):
        p = f"{BLOCK}{i}."
        shapes |= {p + "time_mlp.0.weight": (HIDDEN, EMBED), p + "time_mlp.0.bias": (HIDDEN,),
                   p + "time_mlp.2.weight": (HIDDEN, HIDDEN), p + "time_mlp.2.bias": (HIDDEN,),
                   p + "adaln_modulation.1.weight": (6 * WIDTH, HIDDEN), p + "adaln_modulation.1.bias": (6 * WIDTH,)}
        for site, (fan_in, out) in SITES.items():
            shapes |= {f"{p}block.{site}.lora_a.weight": (RANK, fan_in), f"{p}block.{site}.lora_b.weight": (out, RANK)}
    g = torch.Generator().manual_seed(seed)
    std = {"lora": 0.1, "time_mlp": 0.2, "adaln_modulation": 0.05}  # modest: the net stays well conditioned at 1e-5
    return {k: next(v for part, v in std.items() if part in k) * torch.randn(s, generator=g) for k, s in shapes.items()}


def wrapped(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SMDM's tensors under the reference's module names (DiT wrapper `.block.`, LoRA-wrapped linears `.base.`)."""
    out = {}
    for key, t in base.items():
        if key.startswith("transformer.h."):
            i, rest = key.removeprefix("transformer.h.").split(".", 1)
            rest = rest.replace(".weight", ".base.weight") if rest.removesuffix(".weight") in SITES else rest
            key = f"transformer.h.{i}.block.{rest}"
        out[f"model.{key}"] = t
    return out


def save(path, model, ema, config, full=False, **extra):
    """A checkpoint as the reference's ``save_mlfm_checkpoint`` writes it (the training state included)."""
    payload = {"model": model, "save_full_model": full,
               "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                             "param_groups": [{"lr": 1e-4, "params": [0]}]},
               "scaler": None, "step": 100, "epoch": 0, "config": config, "torch_rng_state": torch.get_rng_state(),
               "cuda_rng_state_all": None, "generator_state": torch.Generator().get_state(),
               "token_counters": {"train/tokens_seen": 1e6}, "ema_adapter": ema, "bridge_noise_sampler": None}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload | extra, path)
    return path


@pytest.fixture
def adapters_only(tmp_path):
    """A pretraining run's checkpoint (adapters, and one base norm it trained) beside its SMDM base."""
    base, src = smdm_state(), tmp_path / "src"
    write(base, src)
    norms = 1 + 0.1 * torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(3))
    live = adapters(1) | {f"{BLOCK}0.block.norm_1.weight": norms[0]}
    ema = adapters(2) | {f"{BLOCK}0.block.norm_1.weight": norms[1]}
    save(src / "checkpoint_00000100.pt", live, ema, ref_config())
    return {"dir": src, "ema": wrapped(base) | ema, "live": wrapped(base) | live}


# --------------------------------------------------------------------- the reference model, from its semantics
def sinusoid(gamma: torch.Tensor, width: int) -> torch.Tensor:
    """The reference's timestep embedding: [cos | sin] of γ·10000^(−i/half), i < half."""
    half = width // 2
    args = gamma[:, None].float() * torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    return torch.cat([args.cos(), args.sin()], -1)


def reference_forward(state: dict[str, torch.Tensor], ids: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """SMDMLitGPTBackbone in DiT mode: a DiTBlockWrapper round each LitGPT block (its own time MLP and
    modulation), LoRALinear on attn/proj/w1/w2/w3, TiedOutputLoRA on the head: ids [b, s], γ [b] → [b, s, V]."""
    w = {k: t.float() for k, t in state.items()}
    b, s = ids.shape
    hd = WIDTH // HEADS
    x = w["model.transformer.wte.weight"][ids]
    features = sinusoid(gamma, EMBED)
    for i in range(LAYERS):
        p = f"{BLOCK}{i}."

        def linear(site: str, h: torch.Tensor, p: str = p) -> torch.Tensor:
            delta = h @ w[f"{p}block.{site}.lora_a.weight"].T @ w[f"{p}block.{site}.lora_b.weight"].T
            return h @ w[f"{p}block.{site}.base.weight"].T + delta * (ALPHA / RANK)

        c = F.silu(features @ w[p + "time_mlp.0.weight"].T + w[p + "time_mlp.0.bias"])
        c = c @ w[p + "time_mlp.2.weight"].T + w[p + "time_mlp.2.bias"]
        cond = F.silu(c) @ w[p + "adaln_modulation.1.weight"].T + w[p + "adaln_modulation.1.bias"]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (m[:, None] for m in cond.chunk(6, -1))
        h = rms_norm(x, w[p + "block.norm_1.weight"]) * (1 + scale_a) + shift_a
        q, k, v = linear("attn.attn", h).view(b, s, HEADS, 3, hd).unbind(-2)  # MHA: per head [q; k; v]
        x = x + (1 + gate_a) * linear("attn.proj", attention(q, k, v, 1e4))
        h = rms_norm(x, w[p + "block.norm_2.weight"]) * (1 + scale_m) + shift_m
        x = x + (1 + gate_m) * linear("mlp.swiglu.w3", F.silu(linear("mlp.swiglu.w1", h)) * linear("mlp.swiglu.w2", h))
    h = rms_norm(x, w["model.transformer.ln_f.weight"])
    delta = h @ w["output_lora.lora_a.weight"].T @ w["output_lora.lora_b.weight"].T
    return h @ w["model.lm_head.weight"].T + delta * (OUT_ALPHA / OUT_RANK)


def converted_logits(plan, ids: torch.Tensor) -> list[torch.Tensor]:
    """MLFMModel (fp32, TP = 1) holding every tensor of ``plan`` → its logits [b, s, V_pad] at each of GAMMAS."""
    model = MLFMModel(cfg(), plan.vocab_size)
    params = dict(model.named_parameters())
    assert {model_name(e.name) for e in plan.entries} == set(params)  # the plan provides every parameter
    with torch.no_grad():
        for entry in plan.entries:
            t = entry.full()
            assert t.dtype == torch.float32 and tuple(t.shape) == entry.shape, entry.name
            params[model_name(entry.name)].copy_(t)
        z = model.embed(ids)
        return [model(z, gamma) for gamma in GAMMAS]


def assert_reference_logits(plan, state):
    ids = inputs(SMDM_VOCAB + 1)  # the mask token is an input like any other
    for gamma, logits in zip(GAMMAS, converted_logits(plan, ids)):
        assert (logits[..., :SMDM_VOCAB] - reference_forward(state, ids, gamma)).abs().max() <= 1e-5
        assert not logits[..., SMDM_VOCAB].any()  # no mask logit: its head and LoRA B rows are zero


# ------------------------------------------------------------------------------------------------ the tests
def test_adapters_only_checkpoint_with_its_base_gives_the_reference_logits(process_group, adapters_only):
    plan = plan_for("mlfm-reference", cfg(), adapters_only["dir"])
    assert (plan.vocab_size, plan.mask_id, plan.source_format) == (SMDM_VOCAB + 1, SMDM_VOCAB, "mlfm-reference")
    assert plan.notes["weights"] == "ema_adapter over model" and plan.notes["step"] == 100
    head = next(e for e in plan.entries if e.name == "output_layer.lora.b")
    assert head.shape == (128, OUT_RANK) and head.read().shape == (SMDM_VOCAB, OUT_RANK)  # padded when written
    ids = inputs(SMDM_VOCAB + 1)
    ema, live = (reference_forward(adapters_only[k], ids, GAMMAS[0]) for k in ("ema", "live"))
    assert (ema - live).abs().max() > 0.1  # the two weight sets are told apart
    assert_reference_logits(plan, adapters_only["ema"])


def test_the_live_weights_on_request(process_group, adapters_only):
    source = reference.ReferenceSource(adapters_only["dir"] / "checkpoint_00000100.pt", weights="model")
    plan = reference.plan(cfg(), source)
    assert plan.notes["weights"] == "model"
    assert_reference_logits(plan, adapters_only["live"])


def test_full_model_checkpoint_gives_the_reference_logits(process_group, tmp_path):
    """An SFT run's checkpoint (save_full_model: the base in bf16, as the reference casts it; its EMA holds the
    trained base too, the frozen embedding table aside); an SMDM file beside it is not read."""
    base = {k: t.bfloat16() for k, t in wrapped(smdm_state()).items()}
    trained = {k: t.bfloat16() for k, t in wrapped(smdm_state(seed=5)).items() if "wte" not in k}
    ema = trained | adapters(2)
    path = save(tmp_path / "sft" / "checkpoint_00000200.pt", base | adapters(1), ema, ref_config(save_full_model=True),
                full=True)
    write(smdm_state(seed=9), tmp_path / "sft")
    plan = plan_for("mlfm-reference", cfg(), path)
    assert plan.notes["full_model"] and plan.notes["base"] == str(path)
    assert_reference_logits(plan, base | ema)


def test_the_convert_command_writes_every_tensor_of_the_plan(process_group, adapters_only, tmp_path):
    from safetensors.torch import load_file

    from mlfm_scale.config import Config
    from mlfm_scale.convert.cli import convert

    run = Config(model=cfg())
    convert("mlfm-reference", adapters_only["dir"], tmp_path / "out", run)
    written = load_file(tmp_path / "out" / "step00000000" / "universal" / "param.safetensors")
    plan = plan_for("mlfm-reference", cfg(), adapters_only["dir"])
    assert set(written) == {e.name for e in plan.entries}  # nothing made fresh: the checkpoint has it all
    for entry in plan.entries:
        torch.testing.assert_close(written[entry.name], entry.full(), rtol=0, atol=0)


def test_a_config_that_differs_is_refused_naming_every_override(adapters_only):
    with pytest.raises(UserError) as e:
        plan_for("mlfm-reference", cfg(rank=8, alpha=16.0, output_alpha=2.0, targets=["qkv", "proj"]).model_copy(
            update={"time_mlp": "shared", "time_hidden_size": 20}), adapters_only["dir"])
    msg = str(e.value)
    assert "its blocks have their own time MLPs (DiT adapters), but model.time_mlp=shared" in msg
    assert f"its LoRA rank is {RANK} (model.transformer.h.0.block.attn.attn.lora_a.weight has {RANK} rows), but " \
           "model.lora.rank=8" in msg
    assert msg.endswith(f"set model.time_mlp=per_layer model.time_hidden_size={HIDDEN} model.lora.rank={RANK} "
                        f"model.lora.alpha={ALPHA} model.lora.targets=[qkv,proj,fc1,fc2] "
                        f"model.lora.output_alpha={OUT_ALPHA}")
    with pytest.raises(UserError, match="model.num_layers=2"):  # the base is checked as format smdm checks it
        plan_for("mlfm-reference", cfg().model_copy(update={"num_layers": 3}), adapters_only["dir"])


@pytest.mark.parametrize(("option", "message"), [
    ({"adaln_mode": "vanilla"}, r"adaln_mode='vanilla': its AdaLN modulates each norm"),
    ({"adaln": False}, r"trained without AdaLN"),
    ({"time_conditioning": "t"}, r"time_conditioning='t'; our model feeds them the raw γ"),
    ({"lora_alpha": None}, r"lora_alpha=None, not a number"),
])
def test_runs_our_layers_do_not_compute_are_refused(tmp_path, option, message):
    write(smdm_state(), tmp_path)
    save(tmp_path / "c.pt", adapters(1), None, ref_config(**option))
    with pytest.raises(UserError, match=message):
        plan_for("mlfm-reference", cfg(), tmp_path)


def test_a_missing_base_or_an_ambiguous_source_is_refused(tmp_path):
    save(tmp_path / "run" / "checkpoint_00000100.pt", adapters(1), adapters(2), ref_config())
    with pytest.raises(UserError, match=r"holds only what the run trained, the adapters .* SMDM's "
                                        r"mdm-1028M-3300e18-rsl-0.01-bs-1024\.safetensors.*put the base's safetensors "
                                        "beside the checkpoint"):
        plan_for("mlfm-reference", cfg(), tmp_path / "run")
    save(tmp_path / "run" / "checkpoint_latest.pt", adapters(1), adapters(2), ref_config())
    with pytest.raises(UserError, match=r"holds 2 \*.pt files .*: give the checkpoint's .pt itself"):
        plan_for("mlfm-reference", cfg(), tmp_path / "run")
    write(smdm_state(), tmp_path / "smdm")  # the base elsewhere: named explicitly
    source = reference.ReferenceSource(tmp_path / "run" / "checkpoint_latest.pt", base=tmp_path / "smdm")
    assert reference.plan(cfg(), source).notes["base"] == str(tmp_path / "smdm")
    with pytest.raises(UserError, match="does not exist"):
        plan_for("mlfm-reference", cfg(), tmp_path / "nowhere")


def test_damaged_and_foreign_files_are_refused(tmp_path):
    write(smdm_state(), tmp_path)
    broken = adapters(1) | {f"{BLOCK}1.adaln_modulation.1.weight": torch.zeros(6 * WIDTH, 20)}
    save(tmp_path / "a" / "c.pt", broken, None, ref_config())
    source = reference.ReferenceSource(tmp_path / "a", base=tmp_path)
    with pytest.raises(UserError, match=r"adaln_modulation.1.weight in .*c.pt has shape \[192, 20\].*\[192, 24\]"):
        reference.plan(cfg(), source)
    extra = adapters(1) | {f"{BLOCK}2.time_mlp.0.bias": torch.zeros(HIDDEN)}
    source = reference.ReferenceSource(save(tmp_path / "b" / "c.pt", extra, None, ref_config()), base=tmp_path)
    with pytest.raises(UserError, match=r"1 tensors that the reference's DiT-mode MLFM checkpoints do not have"):
        reference.plan(cfg(), source)
    torch.save({"state_dict": adapters(1)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a checkpoint of the reference's MLFM runner"):
        plan_for("mlfm-reference", cfg(), tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not a torch.save checkpoint"):
        plan_for("mlfm-reference", cfg(), tmp_path / "junk.pt")


class Opaque:
    """An object weights_only unpickling refuses."""


def test_a_payload_that_would_run_code_is_not_unpickled(tmp_path):
    path = save(tmp_path / "c.pt", adapters(1), None, ref_config(), bridge_noise_sampler=Opaque())
    with pytest.raises(UserError, match=r"refuses to unpickle \(tests.mlfm_scale.convert.test_reference.Opaque\).*"
                                        r"stripped.pt"):
        plan_for("mlfm-reference", cfg(), path)
