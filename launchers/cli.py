"""``mlfm launch KIND CONFIG [key=value ...] [--nodes N ...] [--after JOBID] [--skip KIND] [--dry-run]``: submit a
job kind (``launchers.kinds``) to SLURM with submitit, or ``pipeline`` to chain the registered stages (but the
``--skip``ped ones)."""
from __future__ import annotations

import argparse
import re
import shutil

from launchers import slurm
from launchers.kinds import KINDS, PIPELINE, JobKind, get, pipeline
from launchers.options import resolve_launch
from launchers.submit import submit_chain
from mlfm_scale.cli import add_model_flags
from mlfm_scale.config import LaunchSection, load_config
from mlfm_scale.errors import UserError

FLAG_FIELDS = [name for name in LaunchSection.model_fields if name != "setup"]  # setup: profiles and configs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", help=f"job kind: {', '.join(KINDS)}, or pipeline (the registered ones of "
                                     f"{' → '.join(PIPELINE)}, each after the previous succeeded; after distill, "
                                     "the later stages run on the student in out_dir/distill)")
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=100")
    add_model_flags(parser, LaunchSection, exclude=("setup",))
    parser.add_argument("--after", action="append", default=[], metavar="JOBID",
                        help="start once this job completed successfully (repeatable)")
    parser.add_argument("--skip", action="append", default=[], metavar="KIND",
                        help="pipeline only: leave out this stage (repeatable), e.g. --skip distill")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and each task's command")


def stages(kind: str, skip: list[str]) -> list[JobKind]:
    """The kinds ``mlfm launch KIND`` chains: the pipeline's registered stages but ``skip``, or ``kind`` alone."""
    if kind == "pipeline":
        return pipeline(skip)
    job = get(kind)
    if skip:
        raise UserError(f"--skip {skip[0]}: --skip leaves stages out of `mlfm launch pipeline`; a {kind} job has "
                        "none (drop --skip, or launch pipeline)")
    return [job]


def run(args: argparse.Namespace) -> int:
    kinds = stages(args.kind, args.skip)
    bad = [a for a in args.after if not re.fullmatch(r"\d+(_\d+)?", a)]
    if bad:
        raise UserError(f"--after {bad[0]}: not a SLURM job id (digits, e.g. --after 1234)")
    cfg = load_config(args.config, args.overrides)
    flags = {name: getattr(args, name) for name in FLAG_FIELDS if getattr(args, name) is not None}
    launch = resolve_launch(cfg.launch, flags)
    if not args.dry_run or shutil.which("sinfo"):  # a dry run away from SLURM skips the cluster's checks
        slurm.check_request(launch.partition, launch.nodes)
    ids = submit_chain(kinds, cfg, launch, args.after, args.dry_run)
    if not args.dry_run:
        for kind, job_id in zip(kinds, ids):
            print(f"submitted {kind.name} job {job_id} ({launch.nodes} node(s) × {launch.tasks_per_node} tasks, "
                  f"partition {launch.partition or 'default'}); `mlfm jobs` shows its state")
    return 0
