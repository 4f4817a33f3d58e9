"""Run a function on N gloo processes from a test; each rank's return value comes back in rank order."""
from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(*args)
    except Exception:
        result = RuntimeError(f"rank {rank} failed:\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_distributed(fn, world: int, *args) -> list:
    """``fn(*args)`` on ``world`` spawned processes joined by gloo; ``fn`` must be importable (module level)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(world, free_port(), out, fn, args), nprocs=world, start_method="spawn")
        results = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for r in results:
        if isinstance(r, RuntimeError):
            raise r
    return results
