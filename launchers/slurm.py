"""What the launcher asks SLURM (sinfo, squeue): partitions and their node counts, job states."""
from __future__ import annotations

import shutil
import subprocess

from mlfm_scale.errors import UserError

NO_SLURM = "run on a SLURM login node, or start the local test cluster with ops/local-slurm/up.sh (as root)"


def _query(*cmd: str) -> str:
    if shutil.which(cmd[0]) is None:
        raise UserError(f"{cmd[0]} not found: {NO_SLURM}")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if result.returncode:
        raise UserError(f"`{' '.join(cmd)}` failed: {result.stderr.strip() or result.stdout.strip()}; {NO_SLURM}")
    return result.stdout


def partitions() -> tuple[dict[str, int], str | None]:
    """({partition: node count}, the default partition)."""
    nodes: dict[str, set[str]] = {}
    default = None
    for row in _query("sinfo", "-h", "-a", "-N", "-o", "%P %N").splitlines():
        name, node = row.split()
        if name.endswith("*"):
            name = default = name[:-1]
        nodes.setdefault(name, set()).add(node)
    return {name: len(members) for name, members in nodes.items()}, default


def check_request(partition: str | None, nodes: int) -> None:
    """Refuse a partition the cluster does not have, or more nodes than it holds."""
    known, default = partitions()
    if partition is not None and partition not in known:
        raise UserError(f"partition {partition!r} does not exist on this cluster (partitions: "
                        f"{', '.join(sorted(known)) or 'none'}); set --partition or the cluster profile's partition")
    name = partition or default
    if name is not None and nodes > known[name]:
        raise UserError(f"--nodes {nodes}: partition {name!r} has {known[name]} node(s)")


def queue_states() -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} for every job SLURM still remembers (pending, running, recently ended)."""
    states = {}
    for row in _query("squeue", "-h", "-t", "all", "-o", "%i|%T|%r").splitlines():
        job_id, state, reason = row.split("|")
        states[job_id] = (state, reason)
    return states
