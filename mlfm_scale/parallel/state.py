"""Process-group set-up: torch.distributed from the launcher's environment, then megatron-core's
``parallel_state`` for tensor/pipeline/data-parallel groups (order tp-cp-ep-dp-pp, megatron's default)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mlfm_scale.config import ParallelSection


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (torchrun, the
    deepspeed launcher or our SLURM launcher set them); a single process needs none. Returns (rank, world)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend_for(device))
    return dist.get_rank(), dist.get_world_size()


def init_model_parallel(layout: ParallelSection, seed: int) -> None:
    """Megatron groups for ``layout`` over the current world, and its RNG tracker seeded identically on every
    rank (the inference tracker: megatron's CUDA RNG fork is not needed without dropout in TP regions)."""
    layout.data_parallel_size(dist.get_world_size())  # raises a clear error when tp × pp does not divide
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                             pipeline_model_parallel_size=layout.pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)


@contextmanager
def model_parallel(layout: ParallelSection, seed: int) -> Iterator[None]:
    """``init_model_parallel`` for the duration of a block (tests, tools)."""
    init_model_parallel(layout, seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
