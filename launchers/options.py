"""Launch options: a cluster profile (``configs/clusters/NAME.yaml``) ← the config's ``launch`` keys that
are set ← command-line flags, validated as one :class:`LaunchSection`, then turned into submitit's sbatch
parameters. One task per GPU on GPU nodes."""
from __future__ import annotations

import shlex
from pathlib import Path

from pydantic import ValidationError

from mlfm_scale.config import ConfigError, LaunchSection, read_yaml, slurm_minutes

REPO = Path(__file__).resolve().parent.parent
CLUSTERS = REPO / "configs" / "clusters"


def profile_path(name: str) -> Path:
    """A profile name in ``configs/clusters/`` or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"cluster profile not found: {path}")
        return path
    path = CLUSTERS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CLUSTERS.glob("*.yaml")))
        raise ConfigError(f"unknown cluster profile {name!r}: profiles in {CLUSTERS}: {known} (or give a YAML path)")
    return path


def _validated(values: dict, source: str) -> LaunchSection:
    try:
        return LaunchSection.model_validate(values)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else f"{err['msg']} (got {err.get('input')!r})"
            lines.append(f"  {key} (launch.{key}, --{key.replace('_', '-')}): {msg}")
        raise ConfigError(f"invalid launch options ({source}):\n" + "\n".join(lines)) from None


def load_profile(name: str) -> dict:
    """The keys a cluster profile sets (validated against the launch schema)."""
    path = profile_path(name)
    values = read_yaml(path)
    return _validated(values, str(path)).model_dump(include=set(values))


def resolve_launch(section: LaunchSection, flags: dict) -> LaunchSection:
    """Profile ← ``section``'s keys that were set ← ``flags`` (only the flags given)."""
    given = section.model_dump(include=section.model_fields_set) | flags
    cluster = given.get("cluster")
    merged = (load_profile(cluster) if cluster else {}) | given
    gpus = merged.get("gpus_per_node", 0)
    if gpus:
        if "tasks_per_node" in given and given["tasks_per_node"] != gpus:
            raise ConfigError(f"--tasks-per-node {given['tasks_per_node']} with --gpus-per-node {gpus}: jobs run one "
                              "task per GPU; drop --tasks-per-node (or launch.tasks_per_node)")
        merged["tasks_per_node"] = gpus
    return _validated(merged, "profile, config and flags")


def job_setup(launch: LaunchSection) -> list[str]:
    """Shell lines before the tasks start: this checkout's code first on the path, one intra-op thread per
    allotted core, then the profile's own lines (module loads, NCCL settings, ...). The checkout's path is
    quoted: it may hold spaces or shell characters."""
    return [f'export PYTHONPATH={shlex.quote(str(REPO))}"${{PYTHONPATH:+:$PYTHONPATH}}"',
            "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}", *launch.setup]


def sbatch_parameters(launch: LaunchSection, job_name: str, after: list[str]) -> dict:
    """submitit ``SlurmExecutor.update_parameters`` keywords for ``launch``; ``after``: job ids that must
    complete successfully first (``--dependency=afterok:...``). Requeueable (preemption, time limit)."""
    extra = {"requeue": True}
    if launch.mem is not None:  # as written (submitit's own ``mem`` takes GB as a number)
        extra["mem"] = launch.mem
    params = {"job_name": job_name, "time": slurm_minutes(launch.time), "nodes": launch.nodes,
              "ntasks_per_node": launch.tasks_per_node, "signal_delay_s": launch.signal_delay_s,
              "setup": job_setup(launch), "additional_parameters": extra}
    optional = {"partition": launch.partition, "cpus_per_task": launch.cpus_per_task,
                "gpus_per_node": launch.gpus_per_node or None, "account": launch.account, "qos": launch.qos,
                "constraint": launch.constraint, "dependency": "afterok:" + ":".join(after) if after else None}
    return params | {k: v for k, v in optional.items() if v is not None}
