"""One optimizer step and one evaluation pass, for each engine layout, behind one interface:

    steps.train(micro_batches, seeds) → (loss: mean over micro-batches and data-parallel ranks,
                                          per-sequence STEP_ROWS [5, N] of the whole step, N over all DP ranks)
    steps.evaluate(batches, seeds)    → (mean objective over the batches and data-parallel ranks, STEP_ROWS [5, N])

``DataParallelSteps`` (pp = 1) runs the model and objective as one module per micro-batch; ``PipelineSteps``
feeds the micro-batches to DeepSpeed's pipeline schedule. Only ``reads_data`` ranks are given batches.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from mlfm_scale.data.batch import MicroBatch
from mlfm_scale.parallel.pipeline import STEP_ROWS, last_stage_diagnostics


class ObjectiveStep(nn.Module):
    """The model plus the objective as one module, so DeepSpeed's engine runs (and ZeRO-3 gathers for) the
    whole step: ``forward(tokens, lengths, segment_ids, seed) → (loss, per-sequence diagnostics)``."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, tokens, lengths, segment_ids, seed: int, response=None):
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
        return self.objective(self.model, MicroBatch(tokens, lengths, segment_ids, response), generator)


def dp_mean(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Mean over the data-parallel group, on CPU (reduced on ``device``: NCCL takes CUDA tensors only)."""
    values = values.to(device)
    dist.all_reduce(values, group=ps.get_data_parallel_group())
    return values.cpu() / ps.get_data_parallel_world_size()


def dp_gather(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenation over the data-parallel group along the last dimension, on CPU."""
    t = t.to(device).contiguous()
    parts = [torch.empty_like(t) for _ in range(ps.get_data_parallel_world_size())]
    dist.all_gather(parts, t, group=ps.get_data_parallel_group())
    return torch.cat(parts, dim=-1).cpu()


class DataParallelSteps:
    """pp = 1: forward, backward and (at the accumulation boundary) step per micro-batch."""

    reads_data = True

    def __init__(self, engine, device: torch.device):
        self.engine, self.device = engine, device

    def train(self, micro_batches: list[MicroBatch], seeds: list[int]) -> tuple[float, torch.Tensor]:
        loss_sum, rows = 0.0, []
        for batch, seed in zip(micro_batches, seeds, strict=True):
            loss, diag = self.engine(batch.tokens, batch.lengths, batch.segment_ids, seed, batch.response)
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += float(loss.detach()) / len(micro_batches)
            rows.append(torch.stack([diag[k].float() for k in STEP_ROWS]))
        loss_mean = float(dp_mean(torch.tensor([loss_sum], dtype=torch.float64), self.device))
        return loss_mean, dp_gather(torch.cat(rows, dim=1), self.device)

    @torch.no_grad()
    def evaluate(self, batches: list[MicroBatch], seeds: list[int]) -> tuple[float, torch.Tensor]:
        self.engine.eval()
        total, rows = 0.0, []
        for b, seed in zip(batches, seeds, strict=True):
            loss, diag = self.engine(b.tokens, b.lengths, b.segment_ids, seed, b.response)
            total += float(loss)
            rows.append(torch.stack([diag[k].float() for k in STEP_ROWS]))
        self.engine.train()
        loss_mean = float(dp_mean(torch.tensor([total / len(batches)], dtype=torch.float64), self.device))
        return loss_mean, dp_gather(torch.cat(rows, dim=1), self.device)


class PipelineSteps:
    """pp > 1: DeepSpeed's 1F1B schedule over ``len(micro_batches)`` micro-batches. The first stage is given
    the batches (with each micro-batch's seed); the last stage computes the loss from what the first stage
    sent it, so it reads no data (it is handed placeholders)."""

    def __init__(self, engine, device: torch.device, micro_batch_size: int):
        self.engine, self.device, self.micro_batch_size = engine, device, micro_batch_size
        self.reads_data = ps.is_pipeline_first_stage()

    def _feed(self, batches: list[MicroBatch] | None, seeds: list[int]):
        placeholder = torch.zeros(1)
        if not self.reads_data:
            return iter([(placeholder, placeholder)] * len(seeds))
        items = []
        for b, seed in zip(batches, seeds, strict=True):
            inputs = (b.tokens, b.lengths, b.segment_ids, torch.tensor([seed], dtype=torch.long))
            items.append((inputs + ((b.response,) if b.response is not None else ()), placeholder))
        return iter(items)

    def train(self, micro_batches: list[MicroBatch] | None, seeds: list[int]) -> tuple[float, torch.Tensor]:
        loss = self.engine.train_batch(data_iter=self._feed(micro_batches, seeds))  # DP mean, on every stage
        return float(loss), self._rows(len(seeds))

    def evaluate(self, batches: list[MicroBatch] | None, seeds: list[int]) -> tuple[float, torch.Tensor]:
        loss = self.engine.eval_batch(self._feed(batches, seeds), num_micro_batches=len(seeds))
        return float(loss), self._rows(len(seeds))

    def _rows(self, micro_batches: int) -> torch.Tensor:
        """STEP_ROWS of the micro-batches just run, from the last stage, gathered over data-parallel ranks."""
        diagnostics = last_stage_diagnostics(self.engine.module, micro_batches * self.micro_batch_size, self.device)
        return dp_gather(diagnostics, self.device)
