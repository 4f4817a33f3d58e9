"""Process-group set-up: torch.distributed from the launcher's environment, then megatron-core's
``parallel_state`` for tensor/pipeline/data-parallel groups (order tp-cp-ep-dp-pp, megatron's default).
Every rank dies with its torchrun agent, and collectives on these groups time out (lifeline.py)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mlfm_scale.config import ParallelSection
from mlfm_scale.errors import UserError
from mlfm_scale.parallel.lifeline import collective_timeout, die_with_launcher


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


LOCAL_RANK_FROM = ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")
LOCAL_SIZE_FROM = ("LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE")  # deepspeed, srun, mpirun


def _local_environment() -> None:
    """LOCAL_RANK / LOCAL_WORLD_SIZE (read by DeepSpeed and streaming) from whichever launcher ran us."""
    for name, sources in (("LOCAL_RANK", LOCAL_RANK_FROM), ("LOCAL_WORLD_SIZE", LOCAL_SIZE_FROM)):
        if name not in os.environ:
            found = next((os.environ[s] for s in sources if s in os.environ), None)
            if found is not None:
                os.environ[name] = found.split("(")[0]  # SLURM writes "2(x3)" for 2 tasks on each of 3 nodes
    if int(os.environ["WORLD_SIZE"]) == 1:
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    missing = [n for n in ("LOCAL_RANK", "LOCAL_WORLD_SIZE") if n not in os.environ]
    if missing:
        raise UserError(f"{' and '.join(missing)} unset in a {os.environ['WORLD_SIZE']}-process run: launch with "
                        "torchrun, the deepspeed launcher, `mlfm launch` or srun, or set them per process")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (torchrun, the
    deepspeed launcher or our SLURM launcher set them); a single process needs none. Returns (rank, world)."""
    if not dist.is_initialized():
        die_with_launcher()
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        _local_environment()
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend_for(device), timeout=collective_timeout())
    return dist.get_rank(), dist.get_world_size()


def init_model_parallel(layout: ParallelSection, seed: int) -> None:
    """Megatron groups for ``layout`` over the current world, and its RNG tracker seeded identically on every
    rank (the inference tracker: megatron's CUDA RNG fork is not needed without dropout in TP regions)."""
    layout.data_parallel_size(dist.get_world_size())  # raises a clear error when tp × pp does not divide
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                             pipeline_model_parallel_size=layout.pp,
                                             distributed_timeout_minutes=collective_timeout().total_seconds() / 60)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)


@contextmanager
def model_parallel(layout: ParallelSection, seed: int) -> Iterator[None]:
    """``init_model_parallel`` for the duration of a block (tests, tools)."""
    init_model_parallel(layout, seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
