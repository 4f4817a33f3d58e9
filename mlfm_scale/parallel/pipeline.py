"""Pipeline stages for DeepSpeed's ``PipelineModule``, made of the same pieces as ``MLFMModel``.

    CorruptStage   ids → e, the corruption draws (p, γ, C) and the bridge noise → z; γ → c      (first stage)
    LayerStage ×L  one AdaLN layer: (h, c) → (h, c)
    OutputStage    final RMSNorm → vocab-parallel logits → the MLFM loss (a scalar)              (last stage)

What travels between stages is a flat tuple of tensors (DeepSpeed's p2p knows nothing else):

    h      float [s, b, d]   hidden states (requires grad; z itself when the embeddings are frozen)
    c      float [b, c_d]    γ conditioning (requires grad); dropped after the last layer
    seg    long  [b, s]      attention segments (RoPE positions, document masks); dropped after the last layer
    tokens long  [b, s]      loss targets
    lengths long [b]         real positions per row (token counts)
    C      bool  [b, s]      corrupted positions (the loss set)
    valid  bool  [b, s]      positions that count (the 1/|valid| and SFT weights)
    draws  int32 [b, 2]      (γ, p) as float32 bits: DeepSpeed demands a gradient for every float tensor
                             that crosses a stage, so per-sequence floats travel bit-cast

The first stage draws everything from the micro-batch's generator exactly as the one-stage objective does
(crop, then ``draw``, then the bridge noise), so PP = 1 and PP = 2 see the same corruption.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.spec_utils import build_module
from torch import nn

from mlfm_scale.config import Config
from mlfm_scale.data.batch import MicroBatch
from mlfm_scale.errors import UserError
from mlfm_scale.model.mlfm import (
    EmbeddingLookup,
    build_embedding,
    build_final_norm,
    build_gamma_embedding,
    build_output_layer,
    layer_inputs,
    layer_spec,
    mask_padded_logits,
    padded_vocab_size,
    transformer_config,
)
from mlfm_scale.model.vocab_parallel import VocabOutputs, vocab_parallel_outputs

PARTITION_METHODS = {"layers": "type:LayerStage", "parameters": "parameters"}

STEP_ROWS = ("gamma", "ce", "tokens", "mask_ratio", "accuracy")  # per-sequence diagnostics a step reports


@dataclass
class Targets:
    """What the loss needs from the first stage (the integer and boolean part of the stage tuple); it reads
    as the objective's Draw (gamma, p, corrupted, valid)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    corrupted: torch.Tensor
    valid: torch.Tensor
    draws: torch.Tensor

    @classmethod
    def from_draw(cls, batch: MicroBatch, draw) -> Targets:
        floats = torch.stack([draw.gamma.float(), draw.p.float()], dim=-1).contiguous()
        return cls(batch.tokens, batch.lengths, draw.corrupted, draw.valid, floats.view(torch.int32))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.tokens, self.lengths, self.corrupted, self.valid, self.draws

    @property
    def gamma(self) -> torch.Tensor:
        return self.draws.view(torch.float32)[:, 0]

    @property
    def p(self) -> torch.Tensor:
        return self.draws.view(torch.float32)[:, 1]


class CorruptStage(EmbeddingLookup, nn.Module):
    """(tokens, lengths, segment_ids, seed[1] [, response]) → (z [s, b, d], c, seg, *targets)."""

    def __init__(self, cfg: Config, vocab_size: int, dtype: torch.dtype, objective):
        super().__init__()
        config = transformer_config(cfg.model, cfg.parallel.tp, dtype)
        self.objective = objective
        self.embedding = build_embedding(cfg.model, config, padded_vocab_size(vocab_size, cfg.parallel.tp), cfg.seed)
        self.gamma_embedding = build_gamma_embedding(cfg.model, dtype, cfg.seed)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        tokens, lengths, segment_ids, seed, *response = inputs
        generator = torch.Generator(device=tokens.device).manual_seed(int(seed))
        batch = MicroBatch(tokens, lengths, segment_ids, response[0] if response else None)
        batch = self.objective.crop(batch, generator)
        c = self.objective.corrupt(self, batch, generator)
        z = c.z.to(self.embedding.weight.dtype).transpose(0, 1).contiguous()  # z is float32: cast once, here
        if not z.requires_grad:  # frozen embeddings: DeepSpeed sends a gradient back for every float output
            z.requires_grad_()
        carried = (batch.segment_ids, *Targets.from_draw(batch, c).tensors())  # a crop leaves strided views
        return (z, self.gamma_embedding(c.gamma), *(t.contiguous() for t in carried))


class LayerStage(nn.Module):
    """One AdaLN layer: (h, c, seg, *targets) → the same, or (h, *targets) after the last layer."""

    def __init__(self, cfg: Config, dtype: torch.dtype, backend: str, layer_number: int):
        super().__init__()
        self.cfg, self.backend = cfg.model, backend
        self.last = layer_number == cfg.model.num_layers
        config = transformer_config(cfg.model, cfg.parallel.tp, dtype)
        self.layer = build_module(layer_spec(cfg.model, backend, cfg.seed), config=config, layer_number=layer_number)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, cond, segment_ids, *targets = inputs
        segments, rope = layer_inputs(segment_ids, self.cfg, self.backend)
        hidden, cond = self.layer(hidden, attention_mask=segments.mask, context=cond, rotary_pos_emb=rope,
                                  packed_seq_params=segments.packed)
        return (hidden, *targets) if self.last else (hidden, cond, segment_ids, *targets)


class OutputStage(nn.Module):
    """(h, *targets) → the micro-batch's MLFM loss (a scalar); per-sequence diagnostics of each micro-batch
    wait in ``diagnostics`` until the step or evaluation takes them."""

    def __init__(self, cfg: Config, vocab_size: int, dtype: torch.dtype, objective, sft: bool):
        super().__init__()
        config = transformer_config(cfg.model, cfg.parallel.tp, dtype)
        self.objective, self.sft, self.vocab_size = objective, sft, vocab_size
        padded = padded_vocab_size(vocab_size, cfg.parallel.tp)
        self.vocab_start = ps.get_tensor_model_parallel_rank() * padded // cfg.parallel.tp
        self.final_layernorm = build_final_norm(config)
        self.output_layer = build_output_layer(cfg.model, config, padded, cfg.seed)
        self.diagnostics: list[dict[str, torch.Tensor]] = []

    def vocab_outputs(self, logits: torch.Tensor, targets: torch.Tensor, posterior_mean: bool = False) -> VocabOutputs:
        if posterior_mean:  # check_supported refuses the x̂0 term under a pipeline
            raise UserError("x̂0 needs the embedding table, which the last pipeline stage does not hold")
        return vocab_parallel_outputs(logits, targets, self.vocab_start, None)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        hidden, *tensors = inputs
        targets = Targets(*tensors)
        logits, _ = self.output_layer(self.final_layernorm(hidden))
        logits = mask_padded_logits(logits.transpose(0, 1), self.vocab_size, self.vocab_start)
        batch = MicroBatch(targets.tokens, targets.lengths, response=targets.valid if self.sft else None)
        loss, diagnostics = self.objective.loss(self, logits, batch, targets)
        self.diagnostics.append(diagnostics)
        return loss


def stage_specs(cfg: Config, vocab_size: int, dtype: torch.dtype, backend: str, objective, sft: bool) -> list:
    """DeepSpeed LayerSpecs in global order: each stage builds only its own pieces."""
    from deepspeed.pipe import LayerSpec

    return [LayerSpec(CorruptStage, cfg, vocab_size, dtype, objective),
            *[LayerSpec(LayerStage, cfg, dtype, backend, n) for n in range(1, cfg.model.num_layers + 1)],
            LayerSpec(OutputStage, cfg, vocab_size, dtype, objective, sft)]


def check_supported(cfg: Config) -> None:
    """Refuse pipeline settings this layout cannot run, before any process group work."""
    if cfg.objective.mse_weight > 0:
        raise UserError("objective.mse_weight > 0 needs the clean embeddings and the embedding table on the last "
                        "pipeline stage; with parallel.pp > 1 set objective.mse_weight=0 (or train with pp=1)")
    if cfg.sample.validation.every:
        raise UserError("sample.validation.every > 0 samples with the whole model on one rank; with parallel.pp > 1 "
                        "set sample.validation.every=0 and sample from an export (`mlfm export`, `mlfm sample`)")
    if cfg.model.time_mlp == "per_layer":
        raise UserError("model.time_mlp=per_layer is not supported with parallel.pp > 1 (the sinusoidal features "
                        "sent between stages carry no gradient); train it with pp=1")
    if cfg.distill.teacher is not None or cfg.model.flow_map:
        raise UserError("flow-map distillation (`mlfm distill`) runs teacher and student passes inside each step, "
                        "which DeepSpeed's pipeline schedule cannot: distil with parallel.pp=1 (TP × ZeRO)")
    if cfg.model.num_layers < cfg.parallel.pp:
        raise UserError(f"parallel.pp={cfg.parallel.pp} stages need at least as many layers "
                        f"(model.num_layers={cfg.model.num_layers})")


def build_pipeline(cfg: Config, vocab_size: int, dtype: torch.dtype, backend: str, objective, sft: bool):
    """The ``PipelineModule`` over megatron's groups (after :func:`check_supported`): DeepSpeed's topology (pipe,
    data, model) numbers ranks as megatron's tp-cp-ep-dp-pp order does; checked here, because a mismatch would
    silently mix shards."""
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing process group
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dist.get_world_size() // (tp * pp))
    module = PipelineModule(layers=stage_specs(cfg, vocab_size, dtype, backend, objective, sft), topology=topology,
                            partition_method=PARTITION_METHODS[cfg.parallel.partition],
                            dynamic_shape=cfg.objective.crop_probability > 0 or cfg.stage == "sft")
    grid = module._grid
    mine = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank())
    theirs = (grid.get_slice_parallel_rank(), grid.get_stage_id(), grid.get_data_parallel_id())
    if mine != theirs:
        raise RuntimeError(f"megatron (tp, pp, dp) ranks {mine} differ from DeepSpeed's pipeline grid {theirs}")
    return module


def stage_boundaries(module) -> list[int]:
    """Layer index where each stage starts, plus the end: [0, ..., L + 2] over the (L + 2) pipeline layers."""
    return [int(x) for x in module.parts]


def last_stage_diagnostics(module, rows: int, device: torch.device) -> torch.Tensor:
    """The micro-batches' per-sequence ``STEP_ROWS`` [5, rows] from the last stage, on every stage
    of this pipeline (the γ curve must be the same everywhere: the first stage samples γ from it)."""
    out = torch.zeros(len(STEP_ROWS), rows, dtype=torch.float32, device=device)
    head = module.forward_funcs[-1] if ps.is_pipeline_last_stage() else None
    if head is not None:
        found = head.diagnostics
        head.diagnostics = []
        out.copy_(torch.stack([torch.cat([d[k].float() for d in found]) for k in STEP_ROWS]))
    dist.broadcast(out, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return out.cpu()
