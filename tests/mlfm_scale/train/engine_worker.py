"""A training engine built as ``mlfm train`` builds it, loaded from a checkpoint (of any layout), run in the
processes of ``tests.distributed.run_distributed``: probe logits (raw and EMA) and optionally save it again."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from tests.conftest import REPO


def load_and_probe(overrides: list[str], tag_dir: str, probe: tuple, save_to: str | None = None) -> dict:
    """``probe`` = (z [b, s, d], γ [b], segment ids [b, s]) → {"raw", "ema"}: full-vocabulary logits [b, s, V]."""
    from megatron.core import parallel_state as ps

    from mlfm_scale.config import load_config
    from mlfm_scale.data.loader import load_manifest
    from mlfm_scale.model.mlfm import MLFMModel
    from mlfm_scale.parallel.mpu import MegatronMPU
    from mlfm_scale.parallel.state import init_model_parallel
    from mlfm_scale.train import checkpoint
    from mlfm_scale.train.ema import EMA
    from mlfm_scale.train.engine import build_engine
    from mlfm_scale.train.manager import components
    from mlfm_scale.train.objective import MLFMObjective
    from mlfm_scale.train.steps import ObjectiveStep

    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    init_model_parallel(cfg.parallel, cfg.seed)
    tok = load_manifest(cfg)["tokenizer"]
    model = MLFMModel(cfg.model, tok["vocab_size"], cfg.parallel.tp, backend="sdpa", seed=cfg.seed)
    objective = MLFMObjective(cfg.objective, tok["mask_id"], (tok["eos_id"], tok["pad_id"]))
    engine, _, _ = build_engine(cfg, ObjectiveStep(model, objective), MegatronMPU(), torch.device("cpu"))
    ema = EMA(engine.module, cfg.train.ema_decay, getattr(engine.optimizer, "_partition_all_parameters", None))
    client, own, _ = checkpoint.load(engine, Path(tag_dir).parent, Path(tag_dir).name)
    ema.load_state_dict(own["ema"])
    engine.eval()
    z, gamma, segments = probe

    def logits() -> torch.Tensor:  # this rank's vocabulary slice, gathered over TP, padding removed
        local = model(z, gamma, segments)
        parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=-1)[..., :tok["vocab_size"]]

    with torch.no_grad():
        out = {"raw": logits()}
        with ema.swapped():
            out["ema"] = logits()
    if save_to is not None:
        step = components(client)["counters"]["step"]
        info = {"step": step, "world_size": dist.get_world_size(), "tp": cfg.parallel.tp, "pp": 1,
                "dp": ps.get_data_parallel_world_size(), "zero_stage": cfg.parallel.zero_stage,
                "manifest_sha256": client["manifest_sha256"]}
        checkpoint.save(engine, Path(save_to), step, client, {"ema": ema.state_dict()}, info, 1, None)
    ps.destroy_model_parallel()
    return out


def load_and_probe_pipeline(overrides: list[str], tag_dir: str, probe: tuple) -> dict | None:
    """The pipeline engine ``mlfm train`` builds for ``overrides`` (pp > 1), loaded from ``tag_dir``; ``probe`` run
    through its stages by hand (hidden states and conditioning sent stage to stage). The last stage returns
    {"raw", "ema"} full-vocabulary logits [b, s, V]; the other stages None."""
    from megatron.core import parallel_state as ps

    from mlfm_scale.config import load_config
    from mlfm_scale.data.loader import load_manifest
    from mlfm_scale.model.mlfm import mask_padded_logits
    from mlfm_scale.parallel.pipeline import LayerStage, OutputStage, build_pipeline
    from mlfm_scale.parallel.state import init_model_parallel
    from mlfm_scale.train import checkpoint
    from mlfm_scale.train.ema import EMA
    from mlfm_scale.train.engine import build_engine
    from mlfm_scale.train.objective import MLFMObjective

    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    init_model_parallel(cfg.parallel, cfg.seed)
    tok = load_manifest(cfg)["tokenizer"]
    objective = MLFMObjective(cfg.objective, tok["mask_id"], (tok["eos_id"], tok["pad_id"]))
    module = build_pipeline(cfg, tok["vocab_size"], torch.float32, "sdpa", objective, sft=False)
    engine, _, _ = build_engine(cfg, module, None, torch.device("cpu"))
    ema = EMA(engine.module, cfg.train.ema_decay)
    _, own, _ = checkpoint.load(engine, Path(tag_dir).parent, Path(tag_dir).name)
    ema.load_state_dict(own["ema"])
    engine.eval()
    z, gamma, segments = probe
    stage, stages = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    group = ps.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)

    def logits() -> torch.Tensor | None:
        hidden, cond = z.transpose(0, 1).contiguous(), None
        if stage > 0:
            cond = torch.empty(z.size(0), cfg.model.time_hidden_size)
            dist.recv(hidden, ranks[stage - 1])
            dist.recv(cond, ranks[stage - 1])
        for layer in engine.module.forward_funcs:
            if isinstance(layer, LayerStage):
                hidden, *rest = layer((hidden, cond, segments))
                cond = rest[0] if rest else cond
            elif isinstance(layer, OutputStage):
                local, _ = layer.output_layer(layer.final_layernorm(hidden))
                local = mask_padded_logits(local.transpose(0, 1), tok["vocab_size"], layer.vocab_start)
                parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
                dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
                return torch.cat(parts, dim=-1)[..., :tok["vocab_size"]]
            else:  # the first stage's γ conditioning (its corruption is replaced by the probe's z)
                cond = layer.gamma_embedding(gamma)
        dist.send(hidden.contiguous(), ranks[stage + 1])
        dist.send(cond.contiguous(), ranks[stage + 1])
        return None

    with torch.no_grad():
        out = {"raw": logits()}
        with ema.swapped():
            out["ema"] = logits()
    ps.destroy_model_parallel()
    return out if stage == stages - 1 else None
