"""torch.distributed's rendezvous for a task of a SLURM job: MASTER_ADDR is the first host of the job's node
list, MASTER_PORT is derived from the job id (so concurrent jobs sharing a node do not collide, and a
requeued job reuses its own), RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE come from submitit's
JobEnvironment (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID)."""
from __future__ import annotations

import os
import subprocess

PORT_BASE, PORT_SPAN = 20000, 10000  # 20000–29999: below Linux's ephemeral port range (32768+)


def master_port(job_id: int) -> int:
    return PORT_BASE + job_id % PORT_SPAN


def rendezvous_env(job_id: int, hosts: list[str], global_rank: int, num_tasks: int, local_rank: int,
                   num_nodes: int) -> dict[str, str]:
    """The environment ``init_distributed`` reads, for one task; assumes the same task count on every node."""
    if num_tasks % num_nodes:
        raise RuntimeError(f"{num_tasks} tasks on {num_nodes} nodes: launch the same number of tasks per node")
    return {"MASTER_ADDR": hosts[0], "MASTER_PORT": str(master_port(job_id)), "RANK": str(global_rank),
            "WORLD_SIZE": str(num_tasks), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(num_tasks // num_nodes)}


def node_hostnames(nodelist: str) -> list[str]:
    """``node[1-2],gpu7`` → ``[node1, node2, gpu7]``, as SLURM expands it."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def from_slurm() -> dict[str, str]:
    """The rendezvous environment of the task this runs in (inside a submitit SLURM job)."""
    import submitit

    env = submitit.JobEnvironment()
    return rendezvous_env(int(os.environ["SLURM_JOB_ID"]), node_hostnames(os.environ["SLURM_JOB_NODELIST"]),
                          env.global_rank, env.num_tasks, env.local_rank, env.num_nodes)
