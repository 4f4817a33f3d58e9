"""What every task of a submitted job runs (submitit pickles a :class:`Job` and calls it in each task).

Rendezvous from SLURM → the kind's entry point → for a preemptible kind, USR2 (sent by SLURM
``signal_delay_s`` before the time limit, or by ``scancel --signal=USR2``, e.g. from a site's preemption hook)
sets a stop request instead of submitit's handler; the entry point checkpoints at the next step boundary and
returns, and only then does rank 0 requeue the job (``scontrol requeue``). The requeued job runs this again
and resumes from ``latest``. Rank 0 records RUNNING, COMPLETED and REQUEUED in the job folder's status file
(``launchers.status``); any rank that fails records FAILED.
"""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from launchers import status
from mlfm_scale.errors import UserError
from mlfm_scale.redact import redact_text


class OutOfRequeues(UserError):
    """A preempted job that may not requeue itself again."""


@dataclass
class Job:
    kind: str
    config: dict  # the resolved config (Config.model_dump(mode="json"))
    max_requeues: int

    def __call__(self) -> dict:
        import submitit

        env = submitit.JobEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        report = partial(status.write, env.paths.folder, job_id=env.job_id, restarts=restarts, rank=env.global_rank)
        if env.global_rank == 0:
            report("RUNNING")
        try:
            summary = self._run(restarts, env.global_rank, report)
        except BaseException as e:
            current = status.read(env.paths.folder)  # the first failure is the cause; later ones (peers timing
            if not (current and current["state"] == "FAILED" and current.get("restarts") == restarts):  # out) not
                report("FAILED", error=redact_text(f"{type(e).__name__}: {e}"))
            raise
        if env.global_rank == 0 and not summary.get("preempted"):
            report("COMPLETED")
        return summary

    def _run(self, restarts: int, rank: int, report: Callable[..., None]) -> dict:
        import submitit
        import torch.distributed as dist

        from launchers import rendezvous
        from launchers.kinds import get
        from mlfm_scale.config import build_config
        from mlfm_scale.train.preemption import StopRequest

        kind = get(self.kind)
        os.environ.update(rendezvous.from_slurm())
        cfg = build_config(self.config)
        try:
            if not kind.preemptible:
                return kind.load()(cfg)
            if restarts:  # a requeued run continues from its own latest checkpoint
                cfg.train.resume = "auto"
            stop = StopRequest()
            with stop.installed(signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]):
                summary = kind.load()(cfg, stop=stop)
            if summary["preempted"]:
                self._requeue(summary, restarts, rank, report)
            return summary
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    def _requeue(self, summary: dict, restarts: int, rank: int, report: Callable[..., None]) -> None:
        """After the stop checkpoint (every rank has finished saving): requeue once, from rank 0, which reports
        REQUEUED first (``scontrol requeue`` ends the job)."""
        step, job_id = summary["state"]["step"], os.environ["SLURM_JOB_ID"]
        if restarts >= self.max_requeues:
            raise OutOfRequeues(f"job {job_id} stopped at step {step} ({summary['last_checkpoint']}) after "
                                f"{restarts} requeues (launch.max_requeues={self.max_requeues}); launch it again "
                                "to resume from that checkpoint")
        if rank == 0:
            print(f"[mlfm launch] stopped at step {step} with checkpoint {summary['last_checkpoint']}; requeueing "
                  f"job {job_id} (requeue {restarts + 1} of at most {self.max_requeues})", flush=True)
            report("REQUEUED")
            try:
                subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True,
                               timeout=60)
            except (OSError, subprocess.SubprocessError) as e:
                raise UserError(f"job {job_id} stopped at step {step} with checkpoint {summary['last_checkpoint']}, "
                                f"but `scontrol requeue {job_id}` failed ({e}); launch it again to resume") from None
