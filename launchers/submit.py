"""Submit a job kind (or a chain of them) with submitit, or print what would be submitted.

Per job: the config resolved (absolute ``out_dir``, the kind's ``configure``, the resolved ``launch`` section,
``train.resume=auto`` for preemptible kinds) → sbatch parameters → ``SlurmExecutor.submit(Job(...))`` → the
resolved config written to the job folder ``OUT_DIR/slurm/JOBID/`` (beside submitit's per-rank logs) and the job
added to the index. A chain passes each kind's configured config on to the kinds after it.

Secrets (``mlfm_scale.redact``): the sbatch script must run the real ``launch.setup`` lines, which may export a
credential. It is created readable by its owner only and, once sbatch has taken its copy (SLURM runs that copy,
and reruns it on requeue), rewritten redacted; every other copy (the job's pickled config, ``config.yaml``, the
dry run) is redacted from the start. The tasks never read ``launch.setup``: the script has run it before them.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path

import yaml

from launchers import records
from launchers.job import Job
from launchers.kinds import JobKind
from launchers.options import sbatch_parameters
from launchers.rendezvous import PORT_BASE, PORT_SPAN
from mlfm_scale.config import Config, ConfigError, LaunchSection
from mlfm_scale.errors import UserError
from mlfm_scale.redact import redact, redact_text

JOB_FOLDER = "slurm/%j"  # under out_dir; submitit replaces %j with the job id
JOB_NAME = re.compile(r"[A-Za-z0-9_.-]+")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def configured(kind: JobKind, cfg: Config) -> Config:
    """``cfg`` with an absolute ``out_dir`` (before ``configure`` derives paths from it), as ``kind`` configures
    it: what its job runs and the later jobs of its chain see."""
    cfg = cfg.model_copy(deep=True)
    cfg.out_dir = str(Path(cfg.out_dir).resolve())
    cfg = kind.configured(cfg)
    if CONTROL.search(cfg.out_dir):  # submitit quotes the path, but a newline would still end its #SBATCH line
        raise ConfigError(f"out_dir {cfg.out_dir!r}: a newline or control character would break the job's "
                          "#SBATCH --output line; choose another directory")
    return cfg


def job_config(kind: JobKind, cfg: Config, launch: LaunchSection) -> Config:
    """The config the job runs, as stored with it."""
    cfg = configured(kind, cfg)
    cfg.launch = launch
    if kind.preemptible and cfg.train.resume is None:
        cfg.train.resume = "auto"
    return cfg


def job_name(kind: JobKind, cfg: Config) -> str:
    """``mlfm-KIND-NAME``, the ``#SBATCH --job-name``."""
    if not JOB_NAME.fullmatch(cfg.name):
        raise ConfigError(f"name {cfg.name!r}: it names the SLURM job (mlfm-{kind.name}-NAME, an #SBATCH line), so "
                          "it may contain only letters, digits, _ . - ; set name=...")
    return f"mlfm-{kind.name}-{cfg.name}"


def task_command(folder: Path) -> str:
    """What ``srun`` starts in each task (submitit's runner, with this interpreter)."""
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def dry_run_text(kind: JobKind, cfg: Config, params: dict) -> str:
    """The sbatch script and what each task runs, without submitting anything; secrets redacted."""
    from submitit.slurm.slurm import _make_sbatch_string  # the renderer submitit's executor uses

    folder = Path(cfg.out_dir) / JOB_FOLDER
    launch = cfg.launch
    world = launch.nodes * launch.tasks_per_node
    backend = "NCCL (one task per GPU)" if launch.gpus_per_node else "gloo (CPU)"
    stop = (f"; USR2 → checkpoint at the next step boundary, then requeue (at most {launch.max_requeues} times)"
            if kind.preemptible else "")
    return redact_text("\n".join([
        f"# mlfm launch {kind.name} — dry run, nothing submitted",
        f"# job folder: {folder}  (config.yaml: the resolved config; %j_%t_log.out/.err: each rank's logs)",
        "# ---------------------------------------------------------------- sbatch script",
        _make_sbatch_string(command=task_command(folder), folder=folder, **params).rstrip(),
        f"# ---------------------------------------------------------------- each of the {world} tasks "
        f"({launch.nodes} node(s) × {launch.tasks_per_node}) runs",
        task_command(folder),
        f"#   → launchers.job.Job: MASTER_ADDR = first host of $SLURM_JOB_NODELIST, MASTER_PORT = {PORT_BASE} + "
        f"$SLURM_JOB_ID % {PORT_SPAN}, RANK = $SLURM_PROCID, WORLD_SIZE = {world}, LOCAL_RANK = $SLURM_LOCALID, "
        f"LOCAL_WORLD_SIZE = {launch.tasks_per_node}; {backend}",
        f"#   → {kind.entry}(config){stop}",
        f"#   config: out_dir={cfg.out_dir} train.steps={cfg.train.steps} train.resume={cfg.train.resume}"
        + (f" distill.teacher={cfg.distill.teacher}" if cfg.distill.teacher else "")
        + (f" (set by {kind.configure}; the later jobs of a chain run on it too)" if kind.configure else ""),
    ]))


def submit(kind: JobKind, cfg: Config, launch: LaunchSection, after: list[str], dry_run: bool = False) -> str:
    """Submit one job of ``kind``; returns its id (with ``dry_run``, prints the script and returns a
    placeholder id for the next job of a chain)."""
    import submitit

    if kind.single_task:
        one = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": min(launch.gpus_per_node, 1)}
        launch = launch.model_copy(update=one)
    cfg = job_config(kind, cfg, launch)
    params = sbatch_parameters(launch, job_name(kind, cfg), after)
    if dry_run:
        print(dry_run_text(kind, cfg, params))
        return f"{kind.name.upper()}_JOB_ID"
    executor = submitit.SlurmExecutor(Path(cfg.out_dir) / JOB_FOLDER, python=shlex.quote(sys.executable))
    executor.update_parameters(**params)
    tree = cfg.model_dump(mode="json")
    tree["launch"]["setup"] = redact(tree["launch"]["setup"])  # run by the script, never read by the tasks
    try:
        job = _submit_privately(executor, Job(kind.name, tree, launch.max_requeues))
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
        message = str(e).strip().splitlines()
        raise UserError(f"sbatch refused the {kind.name} job: {' '.join(message[-3:])}") from None
    folder = Path(job.paths.folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False))
    records.append({"job_id": job.job_id, "kind": kind.name, "name": cfg.name, "out_dir": cfg.out_dir,
                    "checkpoints": str(cfg.path(cfg.checkpoint.dir)), "folder": str(folder),
                    "nodes": launch.nodes, "tasks_per_node": launch.tasks_per_node, "after": after,
                    "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return job.job_id


def _submit_privately(executor, job: Job):
    """``executor.submit(job)`` with the sbatch script it writes readable by its owner only, rewritten redacted
    once sbatch has read it, and removed if sbatch refused it."""
    from submitit.core.utils import JobPaths

    scripts = JobPaths.get_first_id_independent_folder(executor.folder)  # where submitit writes the script
    scripts.mkdir(parents=True, exist_ok=True)  # with the usual permissions, before the umask below
    before = set(scripts.glob(".submission_file_*"))
    umask = os.umask(0o077)
    try:
        submitted = executor.submit(job)
    except BaseException:
        for script in set(scripts.glob(".submission_file_*")) - before:
            script.unlink()
        raise
    finally:
        os.umask(umask)
    Path(submitted.paths.folder).chmod(0o777 & ~umask)  # made under the owner-only umask; its logs stay shared
    script = submitted.paths.submission_file
    script.write_text(redact_text(script.read_text()))
    return submitted


def submit_chain(kinds: list[JobKind], cfg: Config, launch: LaunchSection, after: list[str],
                 dry_run: bool = False) -> list[str]:
    """Each kind after the previous one succeeded (the first after ``after``), on the config as the kinds before
    it configured it (after ``distill``: the student's run); returns the job ids."""
    ids = []
    for kind in kinds:
        ids.append(submit(kind, cfg, launch, after, dry_run))
        cfg, after = configured(kind, cfg), [ids[-1]]
    return ids
