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
    from mlfm_scale.train.loop import ObjectiveStep
    from mlfm_scale.train.objective import MLFMObjective

    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    init_model_parallel(cfg.parallel, cfg.seed)
    tok = load_manifest(cfg)["tokenizer"]
    torch.manual_seed(cfg.seed)
    model = MLFMModel(cfg.model, tok["vocab_size"], cfg.parallel.tp, backend="sdpa")
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
        step = client["state"]["step"]
        info = {"step": step, "world_size": dist.get_world_size(), "tp": cfg.parallel.tp, "pp": 1,
                "dp": ps.get_data_parallel_world_size(), "zero_stage": cfg.parallel.zero_stage,
                "manifest_sha256": client["manifest_sha256"]}
        checkpoint.save(engine, Path(save_to), step, client, {"ema": ema.state_dict()}, info, 1, None)
    ps.destroy_model_parallel()
    return out
