"""DeepSpeed over the megatron-core model: its config, the AdamW parameter groups, the LR schedule.

Layouts: TP from megatron-core ``parallel_state`` (passed as ``mpu``) × ZeRO over the data-parallel group;
or a ``PipelineModule`` (its own grid of pipe × data × model ranks, the same groups) × ZeRO-1.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from mlfm_scale.config import Config
from mlfm_scale.errors import UserError
from mlfm_scale.model.lora import is_adapter

ADALN = re.compile(r"(modulation|gamma_embedding|time_mlp)")  # the AdaLN scale/shift/gate and the γ MLPs
NO_DECAY = re.compile(r"norm")  # and biases (by their shape), and AdaLN


def role(name: str) -> str:
    """A parameter's group: ``lora`` (adapters), ``adaln`` (modulation and γ MLPs) or ``base``."""
    return "lora" if is_adapter(name) else "adaln" if ADALN.search(name) else "base"


def apply_trainable(model: nn.Module, cfg: Config) -> None:
    """Which parameters train: those matching ``train.trainable`` (regexes) when set; otherwise, with LoRA on,
    the adapters and AdaLN (the base too when ``train.base_lr`` is set); otherwise all but what the model froze
    (the input embeddings)."""
    patterns, adapted = cfg.train.trainable, cfg.model.lora.enabled
    if not patterns and not adapted:
        return
    regexes = [re.compile(p) for p in patterns]
    matched = 0
    for name, p in model.named_parameters():
        if patterns:
            p.requires_grad_(any(r.search(name) for r in regexes))
        elif role(name) == "base" and cfg.train.base_lr is None:
            p.requires_grad_(False)
        matched += p.requires_grad
    if not matched:
        raise UserError(f"train.trainable {patterns} matches no parameter name")


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """AdamW groups by role (``train.lora_lr``, ``adaln_lr``, ``base_lr``; unset → ``train.lr``), each split into
    decayed matrices and undecayed biases, norms and AdaLN; empty groups left out."""
    t = cfg.train
    lrs = {"lora": t.lora_lr or t.lr, "adaln": t.adaln_lr or t.lr, "base": t.base_lr or t.lr}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            r = role(name)
            decay = p.ndim >= 2 and r != "adaln" and not NO_DECAY.search(name)
            groups.setdefault((r, decay), []).append(p)
    return [{"params": params, "lr": lrs[r], "weight_decay": t.weight_decay if decay else 0.0, "role": r}
            for (r, decay), params in sorted(groups.items())]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step``: linear warmup, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LRSchedule:
    """``lr_factor`` as the LambdaLR's function. An object, not a closure, so the scheduler's state_dict holds its
    settings: a resumed run keeps the horizon ``total`` it was trained with (``train.schedule_steps`` moves it;
    the warmup and floor come from the config: :func:`set_schedule`)."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup, self.total, self.min_ratio)


def set_schedule(scheduler, warmup: int, total: int, min_ratio: float) -> None:
    """Set the LR schedule's settings (after a checkpoint restored its own), and the optimizer's current LR."""
    for fn in scheduler.lr_lambdas:
        fn.warmup, fn.total, fn.min_ratio = warmup, total, min_ratio
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def deepspeed_config(cfg: Config) -> dict:
    zero = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage == 3:
        # every parameter partitioned (none kept whole below a size threshold): the EMA lives on the partitions
        zero.update(contiguous_gradients=True, overlap_comm=False, stage3_param_persistence_threshold=0,
                    stage3_gather_16bit_weights_on_model_save=False)
    pipeline = {}
    if cfg.parallel.pp > 1:
        # every float between stages (h, c) carries a gradient and is sent whole: DeepSpeed's default splits
        # the first output over TP and refuses a second float output
        pipeline = {"pipeline": {"pipe_partitioned": False, "grad_partitioned": False, "use_reentrant": False}}
    return {
        **pipeline,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, model: nn.Module, mpu, device: torch.device):
    """(engine, optimizer, scheduler) for ``model`` under ``cfg``; AdamW is fused on CUDA. ``mpu`` is None for a
    ``PipelineModule`` (its grid is the mpu)."""
    import deepspeed

    apply_trainable(model, cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr,
                                  betas=cfg.train.adam_betas, fused=device.type == "cuda")
    t = cfg.train
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRSchedule(t.warmup_steps, t.schedule_steps or t.steps, t.min_lr_ratio))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                           config=deepspeed_config(cfg), mpu=mpu)
    return engine, optimizer, scheduler
