"""Resume on another layout (data-, tensor-parallel size or ZeRO stage) through the layout-free checkpoint form.

``write_universal(tag_dir)`` (``mlfm reshard CHECKPOINT``; done automatically on a resume whose layout differs)
stores train/universal.py's per-parameter full tensors next to the checkpoint's files::

    TAG/universal/{param,exp_avg,exp_avg_sq,ema}.safetensors   canonical name → full float32 tensor
    TAG/universal/state.pt      client state (config and every registered component: train/manager.py),
                                AdamW's step, the LR schedule and DeepSpeed's step counters
    TAG/universal/checkpoint.json   sizes and sha256 of the above, and the hash of the source's manifest:
                                a form written from other files (a copy placed beside another save of the
                                tag) is rebuilt, not used

``load_resharded(engine, tag_dir)`` (collective) splits each parameter for this rank of the current layout and
writes the weights, the fp32 master copy and both AdamW moments into the freshly built DeepSpeed engine
(``deepspeed.utils.safe_set_full_*``; AdamW's lazily made state is created first), sets the step counts and
the LR schedule (and the LR it reached), and returns the client state and this rank's EMA in the shape
train/ema.py holds it. The loader position is global (samples consumed in the
epoch, one canonical node), so the new data-parallel ranks continue the same sample stream.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from mlfm_scale.train.checkpoint import (
    MANIFEST,
    UNIVERSAL,
    CheckpointError,
    describe,
    manifest_sha256,
    on_rank0,
    verify,
    write_manifest,
)
from mlfm_scale.train.manager import components
from mlfm_scale.train.universal import KINDS, CheckpointReader, canonical_name, load_file, split_tp, tp_partition

STATE = "state.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


def write_universal(tag_dir: Path, out: Path | None = None) -> Path:
    """Write the layout-free form of the checkpoint ``tag_dir`` (verified first) to ``out`` (default
    ``tag_dir/universal``), one kind at a time; returns ``out``."""
    from safetensors.torch import save_file

    out = out or tag_dir / UNIVERSAL
    if out == tag_dir / UNIVERSAL and current_universal(tag_dir):  # e.g. `mlfm convert`'s output: nothing to do
        return out
    reader = CheckpointReader(tag_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    kinds = [k for k in KINDS if k != "ema" or reader.has_ema()]
    for kind in kinds:
        save_file({n: t.contiguous() for n, t in reader.read([kind])[kind].items()}, out / f"{kind}.safetensors")
    states = reader.client_state()
    client = {"components": components(states), "manifest_sha256": states["manifest_sha256"],
              "config": states["config"]}
    torch.save({"client": client, "optimizer_step": reader.optimizer_step(), "lr_scheduler": states["lr_scheduler"],
                "engine": {k: states[k] for k in ("global_steps", "global_samples", "skipped_steps")},
                "source": {k: reader.info[k] for k in ("world_size", "tp", "pp", "dp", "zero_stage")}}, out / STATE)
    names = [STATE, *(f"{k}.safetensors" for k in kinds)]
    write_manifest(out, {"step": reader.info["step"], "universal_of": str(tag_dir),
                         "source_manifest_sha256": manifest_sha256(tag_dir)}, describe(out, names))
    return out


def current_universal(tag_dir: Path) -> bool:
    """Whether ``tag_dir/universal`` verifies and was written from ``tag_dir``'s files as they are now."""
    try:
        manifest = verify(tag_dir / UNIVERSAL)
    except CheckpointError:
        return False
    return manifest.get("source_manifest_sha256") == manifest_sha256(tag_dir)


def layout_changed(info: dict, engine) -> bool:
    """Whether the checkpoint described by ``info`` (its checkpoint.json) was written by another layout."""
    from megatron.core import parallel_state as ps

    now = (dist.get_world_size(), ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size(),
           engine.zero_optimization_stage())
    return (info.get("world_size"), info.get("tp"), info.get("dp"), info.get("zero_stage")) != now


def _zero3_partition(local: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """This rank's ZeRO-3 partition (``size`` elements, zero-padded at the end) of a TP-local tensor."""
    flat = local.flatten()
    part = torch.zeros(size, dtype=flat.dtype, device=flat.device)
    piece = flat[rank * size:(rank + 1) * size]
    part[:piece.numel()] = piece
    return part


def _init_adamw_state(engine, step: int) -> None:
    """Give every flat fp32 partition of a fresh engine's ``torch.optim.AdamW`` (which creates its state lazily,
    at the first step) the state it has after ``step`` steps, as AdamW makes it; the moments are set later."""
    zero, inner = engine.optimizer, engine.optimizer.optimizer
    zero3 = engine.zero_optimization_stage() == 3
    # the flat fp32 partitions AdamW steps (ZeRO-3 hands them to it only while stepping)
    tensors = zero.fp32_partitioned_groups_flat if zero3 else zero.single_partition_of_fp32_groups
    on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
    for p in tensors:
        state = inner.state[p]
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")
        state.setdefault("exp_avg", torch.zeros_like(p))
        state.setdefault("exp_avg_sq", torch.zeros_like(p))
    if not zero3:  # ZeRO-1/2 link each parameter to its state fragments after the first step (a pinned private API)
        zero._lazy_init_hp_params_optimizer_state()


class UniversalReads:
    """Rank-local reads of ``tag_dir/universal`` (collective to build: rank 0 writes it first unless a current one
    is there): each parameter split for this rank of the current layout, held as ZeRO-3 partitions when ``zero3``."""

    def __init__(self, tag_dir: Path, zero3: bool, device: torch.device):
        from megatron.core import parallel_state as ps
        from safetensors import safe_open

        universal = tag_dir / UNIVERSAL

        def prepare() -> None:
            if not current_universal(tag_dir):
                write_universal(tag_dir, universal)

        on_rank0(prepare)
        self.tag_dir, self.saved = tag_dir, load_file(universal / STATE)
        self.tp, self.tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.dp_rank, self.zero3, self.device = ps.get_data_parallel_rank(), zero3, device
        self.files = {k: safe_open(universal / f"{k}.safetensors", "pt") for k in KINDS
                      if (universal / f"{k}.safetensors").is_file()}

    @classmethod
    def for_engine(cls, engine, tag_dir: Path) -> UniversalReads:
        return cls(tag_dir, engine.zero_optimization_stage() == 3, next(engine.module.parameters()).device)

    def has(self, kind: str, name: str) -> bool:
        return kind in self.files and canonical_name(name) in self.files[kind].keys()

    def local(self, kind: str, name: str) -> torch.Tensor:
        c = canonical_name(name)
        if not self.has(kind, name):
            raise CheckpointError(f"{self.tag_dir}: no {kind} for parameter {c} (trained with another model or "
                                  "train.trainable?)")
        return split_tp(self.files[kind].get_tensor(c), tp_partition(c), self.tp, self.tp_rank).to(self.device)

    def full_shaped(self, kind: str, name: str, p: torch.nn.Parameter) -> torch.Tensor:
        """``local(kind, name)`` after checking the source's full shape against ``p``'s (a vocabulary or width
        that differs is named, not a reshape error)."""
        c = canonical_name(name)
        shape = list(getattr(p, "ds_shape", p.shape))
        if (partition := tp_partition(c)) is not None:
            shape[partition[0]] *= self.tp
        found = list(self.files[kind].get_slice(c).get_shape())
        if found != shape:
            vocab = c in ("embedding.weight", "output_layer.weight")
            why = "the vocabulary differs (prepare the data with the source's tokenizer)" if vocab else \
                "the model config differs"
            raise CheckpointError(f"{self.tag_dir}: {c} is {found} there and {shape} in this model: {why}")
        return self.local(kind, name)

    def held(self, p: torch.nn.Parameter, tensor: torch.Tensor) -> torch.Tensor:
        """A TP-local tensor the way ``p`` holds it (its ZeRO-3 partition, or the whole)."""
        return _zero3_partition(tensor, p.ds_tensor.numel(), self.dp_rank) if self.zero3 else tensor.view_as(p)

    def set_weights(self, p: torch.nn.Parameter, weights: torch.Tensor) -> None:
        """The module's weights and, for a trained parameter, the optimizer's fp32 master copy."""
        from deepspeed.utils import safe_set_full_fp32_param

        (p.ds_tensor if self.zero3 else p.data).copy_(self.held(p, weights))
        if p.requires_grad:
            safe_set_full_fp32_param(p, weights)


@torch.no_grad()
def load_resharded(engine, tag_dir: Path) -> tuple[dict, dict]:
    """Collective: load ``tag_dir`` (any layout) into ``engine`` (this layout); returns (client state, this rank's
    own state ``{"ema": ...}``). Rank 0 writes ``tag_dir/universal`` first unless a current one is there."""
    from deepspeed.utils import safe_set_full_optimizer_state

    src = UniversalReads.for_engine(engine, tag_dir)
    groups = len(engine.lr_scheduler.optimizer.param_groups)
    if len(src.saved["lr_scheduler"]["base_lrs"]) != groups:
        raise CheckpointError(f"{tag_dir} was trained with {len(src.saved['lr_scheduler']['base_lrs'])} AdamW "
                              f"parameter groups, this version makes {groups} (by role: LoRA, AdaLN, base): resume it "
                              f"with the version that wrote it, or start a new run from its weights with "
                              f"train.init_from={tag_dir}")
    _init_adamw_state(engine, src.saved["optimizer_step"])
    ema = {}
    for name, p in engine.module.named_parameters():
        src.set_weights(p, src.local("param", name))
        if not p.requires_grad:
            continue
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, src.local(key, name), key)
        if "ema" in src.files:
            ema[name] = src.held(p, src.local("ema", name))
    engine.lr_scheduler.load_state_dict(src.saved["lr_scheduler"])  # its optimizer's groups keep their LR until set:
    for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    for key, value in src.saved["engine"].items():
        setattr(engine, key, value)
    dist.barrier()
    return src.saved["client"], {"ema": ema}


@torch.no_grad()
def load_weights(engine, tag_dir: Path, kind: str = "param") -> tuple[dict, list[str]]:
    """Collective: only the weights (``param``, or the ``ema`` weights) of ``tag_dir`` (any layout) into a fresh
    ``engine``; its optimizer, schedule and counters stay new. Returns (the source's client state, the canonical
    names the source lacks, which keep their initialisation). Only adapters and AdaLN may be missing (a
    pretraining checkpoint starting an adapter run): they start as a new run's do (modulation and LoRA B zero)."""
    from mlfm_scale.train.engine import role

    src = UniversalReads.for_engine(engine, tag_dir)
    if kind not in src.files:
        raise CheckpointError(f"{tag_dir} holds no {kind} weights: set train.init_weights=param")
    _init_adamw_state(engine, 0)  # AdamW's state as its first step makes it, so the fp32 copies can be set
    names = [n for n, _ in engine.module.named_parameters()]
    missing = [canonical_name(n) for n in names if not src.has(kind, n)]
    if base := [n for n in missing if role(n) == "base"]:
        raise CheckpointError(f"{tag_dir} has no weights for {len(base)} parameters of this model, e.g. "
                              f"{', '.join(base[:3])}: it was trained or converted with another model config")
    held = [None] * dist.get_world_size()  # a pipeline stage holds only its own layers
    dist.all_gather_object(held, [canonical_name(n) for n in names])
    if extra := sorted(set(src.files[kind].keys()) - set().union(*held)):
        raise CheckpointError(f"{tag_dir} has weights this model lacks, e.g. {', '.join(extra[:3])}: its model "
                              "config differs (model.lora, model.time_mlp?); set the source's model section")
    for name, p in engine.module.named_parameters():
        if src.has(kind, name):
            src.set_weights(p, src.full_shaped(kind, name, p))
    dist.barrier()
    return src.saved["client"], missing


@torch.no_grad()
def load_frozen(module: torch.nn.Module, src: UniversalReads, kind: str) -> None:
    """Every parameter of ``module`` (outside any engine: this rank's TP slice, no ZeRO; ``src`` read with
    ``zero3=False``) from ``src``'s ``kind`` weights; the
    checkpoint must hold exactly the module's parameters."""
    if kind not in src.files:
        raise CheckpointError(f"{src.tag_dir} holds no {kind} weights: set distill.teacher_weights=param")
    names = {canonical_name(n) for n, _ in module.named_parameters()}
    held = set(src.files[kind].keys())
    if names != held:
        missing, extra = sorted(names - held), sorted(held - names)
        raise CheckpointError(f"{src.tag_dir} does not hold this model's parameters (missing: {missing[:3]}, "
                              f"extra: {extra[:3]}): its model config differs")
    for name, p in module.named_parameters():
        p.copy_(src.full_shaped(kind, name, p).view_as(p))


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint tag directory (…/stepNNNNNNNN) or a checkpoint directory "
                        "holding `latest`")
    parser.add_argument("--out", default=None, help=f"where to write it (default: CHECKPOINT/{UNIVERSAL}, where a "
                        "resume on another layout looks for it)")


def run(args: argparse.Namespace) -> int:
    from mlfm_scale.train.checkpoint import resolve

    ckpt_dir, tag = resolve(args.checkpoint, what="CHECKPOINT")
    out = write_universal(ckpt_dir / tag, Path(args.out) if args.out else None)
    print(f"wrote the layout-free form of {ckpt_dir / tag} to {out}; resume with any layout "
          f"(train.resume={ckpt_dir / tag})")
    return 0
