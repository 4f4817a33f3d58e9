"""``mlfm jobs``: this project's SLURM jobs (``launchers.records``) with their state (from SLURM, or from the
job's own status file once SLURM forgot it) and the step of their latest checkpoint."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from launchers import records, slurm, status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--last", type=int, default=20, help="show the newest N jobs (default: %(default)s)")


def ended_state(record: dict) -> tuple[str, str]:
    """(state, reason) of a job SLURM no longer lists, from the status file the job wrote
    (``launchers.status``); UNKNOWN when it has none or stopped before its last word (killed, out of memory,
    node lost). Reasons have no spaces, like SLURM's, so the columns split."""
    info = status.read(Path(record["folder"]))
    if info is None:
        return "UNKNOWN", "NoStatusFile"
    if info["state"] in ("COMPLETED", "FAILED"):
        return info["state"], info.get("error", "").partition(":")[0]
    return "UNKNOWN", "EndedUnreported"


def latest_step(record: dict) -> int | None:
    from mlfm_scale.train.checkpoint import latest_tag, step_of

    tag = latest_tag(Path(record["checkpoints"]))
    return None if tag is None else step_of(tag)


def run(args: argparse.Namespace) -> int:
    jobs = records.read()[-args.last:]
    if not jobs:
        print(f"no jobs launched from this project yet ({records.index_path()})")
        return 0
    states = slurm.queue_states() if shutil.which("squeue") else {}
    print(f"{'JOBID':>8}  {'KIND':<9} {'NAME':<12} {'STATE':<11} {'REASON':<16} {'NODES':>5}  {'LATEST':>7}  OUT_DIR")
    for job in jobs:
        state, reason = states[job["job_id"]] if job["job_id"] in states else ended_state(job)
        reason = "" if reason == "None" else reason
        step = latest_step(job)
        print(f"{job['job_id']:>8}  {job['kind']:<9} {job['name']:<12} {state:<11} {reason:<16} {job['nodes']:>5}  "
              f"{'-' if step is None else step:>7}  {job['out_dir']}")
    return 0
