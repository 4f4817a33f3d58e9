from pathlib import Path

import pytest

from mlfm_scale.config import Config, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("preset", ["smdm-170m", "smdm-1028m", "8b"])
def test_production_presets_do_not_inherit_the_demo_settings(preset):
    cfg, demo = load_config(CONFIGS / f"{preset}.yaml"), load_config(CONFIGS / "tiny.yaml")
    assert (cfg.train.ema_decay, cfg.train.adam_betas, cfg.train.weight_decay) == (0.999, (0.9, 0.95), 0.01)
    assert (cfg.train.warmup_steps, cfg.train.min_lr_ratio, cfg.train.steps) == (3000, 0.1, 200000)
    assert cfg.checkpoint.every > demo.checkpoint.every and cfg.checkpoint.keep_every is not None
    assert cfg.train.eval_every >= 1000 and cfg.model.embedding_std == "litgpt"


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.lr=3e-4", "parallel.tp=2", "train.resume=auto",
                                              "model.attend_within_documents=true", "data.prep.tokenizer=null"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.parallel.tp == 2 and cfg.train.resume == "auto" and cfg.model.attend_within_documents is True
    assert cfg.data.prep.tokenizer is None
    assert cfg.model.hidden_size == 64  # from the file, untouched


@pytest.mark.parametrize("override, where", [
    ("train.lrr=1", "train.lrr: unknown key"),
    ("train.steps=abc", "train.steps"),
    ("model.attention=cuda", "model.attention"),
    ("nosuchsection.x=1", "nosuchsection: unknown key"),
    ("objective.sigma=-1", "objective.sigma"),
])
def test_bad_overrides_name_the_key_path(override, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_malformed_override_and_non_section():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="train.lr is not a section"):
        load_config(CONFIGS / "tiny.yaml", ["train.lr.x=1"])


def test_unsupported_parallel_layout_is_explained():
    with pytest.raises(ConfigError, match="TP × PP × ZeRO-1"):
        load_config(None, ["parallel.pp=2", "parallel.zero_stage=3"])
    cfg = load_config(None, ["parallel.pp=2", "parallel.zero_stage=1", "parallel.tp=2"])
    assert cfg.parallel.data_parallel_size(8) == 2
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.parallel.data_parallel_size(6)


def test_extends_merges_and_detects_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {hidden_size: 128, num_heads: 8}\ntrain: {lr: 0.01}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmodel: {num_layers: 3}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_layers, cfg.train.lr) == (128, 8, 3, 0.01)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_file_problems_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("model: {hidden_size: 64\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        load_config(None, ["model.hidden_size=66"])
    with pytest.raises(ConfigError, match="gamma_min"):
        load_config(None, ["objective.gamma_min=7"])


def test_yaml_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["seed=7"])
    (tmp_path / "resolved.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_slurm_time_limits():
    from mlfm_scale.config import slurm_minutes

    assert [slurm_minutes(t) for t in ("5", "5:30", "01:00:00", "1-0", "1-02:03", "0:0:59")] == [5, 6, 60, 1440,
                                                                                              1563, 1]
    for bad in ("1h", "0", "", "1-", "1:2:3:4"):
        with pytest.raises(ValueError):
            slurm_minutes(bad)
