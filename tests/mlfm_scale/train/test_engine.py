import math

import pytest

from mlfm_scale.config import ModelSection, load_config
from mlfm_scale.errors import UserError
from mlfm_scale.model.mlfm import MLFMModel
from mlfm_scale.train.engine import apply_trainable, deepspeed_config, lr_factor, param_groups
from mlfm_scale.train.trainer import BadStepGuard, step_seed

CFG = ModelSection(num_layers=1, hidden_size=32, num_heads=4, ffn_hidden_size=64, time_embed_dim=16,
                   time_hidden_size=32)


def groups_by_name(model, cfg):
    names = {id(p): n for n, p in model.named_parameters()}
    return {(g["role"], g["weight_decay"], g["lr"]): {names[id(p)] for p in g["params"]}
            for g in param_groups(model, cfg)}


def test_weight_decay_skips_norms_biases_and_adaln(process_group):
    model = MLFMModel(CFG, 50, seed=0)
    groups = groups_by_name(model, load_config(None, ["train.weight_decay=0.1", "train.lr=0.5"]))
    assert set(groups) == {("adaln", 0.0, 0.5), ("base", 0.1, 0.5), ("base", 0.0, 0.5)}
    assert {"decoder.layers.0.modulation.weight", "decoder.layers.0.modulation.bias",
            "gamma_embedding.mlp.0.weight"} <= groups["adaln", 0.0, 0.5]
    assert "decoder.final_layernorm.weight" in groups["base", 0.0, 0.5]
    assert all("norm" not in n for n in groups["base", 0.1, 0.5])
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in groups["base", 0.1, 0.5]


def test_trainable_subset_freezes_the_rest(process_group):
    model = MLFMModel(CFG, 50, seed=0)
    cfg = load_config(None, ["train.trainable=[modulation,gamma_embedding]"])
    apply_trainable(model, cfg)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("modulation" in n or "gamma_embedding" in n for n in trained)
    assert set().union(*groups_by_name(model, cfg).values()) == trained
    with pytest.raises(UserError, match="matches no parameter"):
        apply_trainable(model, load_config(None, ["train.trainable=[nothing-like-this]"]))


LORA = ["model.lora.rank=4", "model.lora.output_rank=2", "train.lr=1.0", "train.lora_lr=0.25",
        "train.adaln_lr=0.5"]


def test_lora_trains_adapters_and_adaln_at_their_own_rates(process_group):
    cfg = load_config(None, LORA)
    model = MLFMModel(CFG.model_copy(update={"lora": cfg.model.lora}), 50, seed=0)
    apply_trainable(model, cfg)
    groups = groups_by_name(model, cfg)
    assert set(groups) == {("lora", 0.01, 0.25), ("adaln", 0.0, 0.5)}
    assert groups["lora", 0.01, 0.25] == {n for n, _ in model.named_parameters() if ".lora." in n}
    assert "output_layer.lora.b" in groups["lora", 0.01, 0.25]
    assert len(groups["lora", 0.01, 0.25]) == 2 * (4 + 1)  # A and B on qkv, proj, fc1, fc2 and the head
    # train.base_lr unfreezes the base at its own rate; the input embeddings stay frozen
    cfg = load_config(None, [*LORA, "train.base_lr=0.125"])
    model = MLFMModel(CFG.model_copy(update={"lora": cfg.model.lora}), 50, seed=0)
    apply_trainable(model, cfg)
    groups = groups_by_name(model, cfg)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in groups["base", 0.01, 0.125]
    assert "embedding.weight" not in set().union(*groups.values())


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_factor(s, warmup=10, total=110, min_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5) and lrs[110] == pytest.approx(0.1) and lrs[119] == 0.1


def test_deepspeed_config_follows_the_layout():
    ds = deepspeed_config(load_config(None, ["train.grad_accum=4", "train.dtype=bf16", "parallel.zero_stage=3"]))
    assert ds["gradient_accumulation_steps"] == 4 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0


def test_bad_steps_are_counted_in_a_row_and_since_the_last_save():
    guard = BadStepGuard(limit=3)
    assert guard.record(1.0, 1.0)
    assert not guard.record(math.nan, 1.0) and not guard.record(1.0, math.inf)
    assert guard.record(1.0, 1.0) and guard.since_save == 2 and guard.in_a_row == 0
    guard.record(math.nan, math.nan)
    guard.record(math.nan, math.nan)
    assert not guard.exhausted
    guard.record(math.inf, 1.0)
    assert guard.exhausted and guard.since_save == 5


def test_step_seeds_differ_by_step_micro_and_data_rank_only():
    seeds = {step_seed(0, s, m, r) for s in range(3) for m in range(2) for r in range(2)}
    assert len(seeds) == 12 and step_seed(0, 1, 0, 1) == step_seed(0, 1, 0, 1) < 2**63
