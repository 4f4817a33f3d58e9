"""LoRA adapters on megatron-core's tensor-parallel linears (MLFM.md, Model: MDM → MLFM conversion).

For a frozen base W [out, in]: y = W x + (α/r)·B A dropout(x), with A [r, in] Kaiming-uniform and B [out, r]
zero, so an adapted model starts as its base. Each adapter is sharded the way its base is:

    column parallel (qkv, fc1, the output head): W's rows split over TP → B's rows split, A whole on each rank;
    row parallel (proj, fc2):                    W's columns split     → A's columns split, B whole.

SwiGLU's fused fc1 = [gate; up] gets one adapter per half (A [2, r, in], B [2, ffn, r]), as separate gate and up
projections would (the reference's w1 and w2): each rank's rows [gate_r; up_r] come from B[:, rows_r].

The low-rank activation A x is reduced over TP where the base reduces (row parallel: forward all-reduce;
column parallel: backward all-reduce of its gradient), so every TP size computes the TP = 1 adapter.
An adapter is a child module ``lora`` of its base linear, run by a forward hook: the base keeps its parameter
names (checkpoints, reshard and export read them unchanged) and ZeRO-3 gathers the adapter by its own hooks.
"""
from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
)
from torch import nn

from mlfm_scale.config import LoRASection, ModelSection
from mlfm_scale.errors import UserError
from mlfm_scale.model.init import seeded

# target → (attribute path inside an AdaLN layer, adapters side by side: fc1's gate and up halves)
TARGETS = {"qkv": ("self_attention.linear_qkv", 1), "proj": ("self_attention.linear_proj", 1),
           "fc1": ("mlp.linear_fc1", 2), "fc2": ("mlp.linear_fc2", 1)}


def target_shapes(cfg: ModelSection) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target's full (TP = 1) base linear; fc1's out covers gate and up."""
    d, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    qkv = (cfg.num_heads + 2 * cfg.query_groups) * (d // cfg.num_heads)
    return {"qkv": (d, qkv), "proj": (d, d), "fc1": (d, 2 * ffn), "fc2": (ffn, d)}


def initial_a(rank: int, in_features: int, seed: int, piece: str, parts: int = 1) -> torch.Tensor:
    """The full A [rank, in] (``parts`` > 1: [parts, rank, in]) of adapter ``piece``: Kaiming-uniform (a = √5,
    as nn.Linear and PEFT), float32, drawn from (seed, piece) so that every TP size, pipeline stage and ``mlfm
    convert`` draw the same matrix."""
    a = torch.empty(parts, rank, in_features)
    with seeded(seed, piece):
        for part in a:
            nn.init.kaiming_uniform_(part, a=math.sqrt(5))
    return a[0] if parts == 1 else a


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: megatron's all-reduce (``mappings._reduce``)
    reduces ``grad.contiguous()``, a copy, when the gradient is not contiguous, and returns it un-reduced."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _tp() -> tuple[int, int]:
    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


class LoRAAdapter(nn.Module):
    """The low-rank delta of one parallel linear. ``column``: x [..., in] → [..., out/tp] (B's rows sharded;
    ``parts`` adapters side by side, each for out/parts rows); row: x [..., in/tp] → [..., out] (A's columns
    sharded)."""

    def __init__(self, column: bool, in_features: int, out_features: int, rank: int, alpha: float,
                 dropout: float, seed: int, piece: str, dtype: torch.dtype, parts: int = 1):
        super().__init__()
        tp, tp_rank = _tp()
        if dropout and tp > 1:
            raise UserError("model.lora.dropout > 0 needs parallel.tp=1: the dropout mask of the replicated input "
                            "would differ between tensor-parallel ranks")
        self.column, self.scale, self.tp, self.parts = column, alpha / rank, tp, parts
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        a = initial_a(rank, in_features, seed, piece, parts)
        if not column:
            a = a.chunk(tp, dim=1)[tp_rank]
        self.a = nn.Parameter(a.to(dtype).contiguous())
        rows = out_features // tp if column else out_features
        b = torch.zeros(rows, rank, dtype=dtype) if parts == 1 else torch.zeros(parts, rows // parts, rank, dtype=dtype)
        self.b = nn.Parameter(b)
        sharded = self.b if column else self.a
        set_tensor_model_parallel_attributes(sharded, True, int(parts > 1) if column else 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        u = x @ self.a.transpose(-1, -2) if self.parts == 1 else torch.einsum("...i,pri->...pr", x, self.a)
        if self.tp > 1 and self.column:  # backward: the all-reduce of u's gradient, made contiguous first
            u = _ContiguousGrad.apply(copy_to_tensor_model_parallel_region(u))
        elif self.tp > 1:
            u = reduce_from_tensor_model_parallel_region(u.contiguous())
        if self.parts == 1:
            return u @ self.b.t() * self.scale
        return torch.einsum("...pr,por->...po", u, self.b).flatten(-2) * self.scale


def _add_delta(module: nn.Module, args: tuple, output: tuple) -> tuple:
    out, bias = output
    return out + module.lora(args[0]).to(out.dtype), bias


def attach(linear: nn.Module, column: bool, in_features: int, out_features: int, rank: int, alpha: float,
           dropout: float, seed: int, piece: str, parts: int = 1) -> None:
    """Give the parallel ``linear`` (its output: (y, bias)) an adapter at ``linear.lora``."""
    linear.lora = LoRAAdapter(column, in_features, out_features, rank, alpha, dropout, seed, piece,
                              linear.weight.dtype, parts)
    linear.register_forward_hook(_add_delta)


def attach_to_layer(layer: nn.Module, model: ModelSection, seed: int) -> None:
    """Adapters on an AdaLN layer's ``model.lora.targets`` (pieces ``layer{n}.lora.{target}``)."""
    cfg, shapes = model.lora, target_shapes(model)
    for target in cfg.targets:
        path, parts = TARGETS[target]
        linear = layer.get_submodule(path)
        attach(linear, isinstance(linear, ColumnParallelLinear), *shapes[target], cfg.rank, cfg.alpha, cfg.dropout,
               seed, f"layer{layer.layer_number}.lora.{target}", parts)


def attach_to_output(output_layer: nn.Module, cfg: LoRASection, hidden: int, padded_vocab: int, seed: int) -> None:
    """The output head's delta (rank ``output_rank``, α ``output_alpha``), vocab-parallel like the head."""
    attach(output_layer, True, hidden, padded_vocab, cfg.output_rank, cfg.output_alpha, cfg.dropout, seed,
           "output_layer.lora")


def is_adapter(name: str) -> bool:
    """Whether parameter ``name`` belongs to a LoRA adapter."""
    return ".lora." in f".{name}"
