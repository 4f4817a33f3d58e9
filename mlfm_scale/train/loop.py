"""``mlfm train CONFIG [key=value ...]``: pretrain an MLFM from streaming shards on 1..N processes;
``mlfm distill CONFIG distill.teacher=CHECKPOINT_DIR [key=value ...]``: distil a flow-map student from it.

Run it under torchrun / the deepspeed launcher / SLURM, or let ``--nproc N`` start torchrun on this machine.
Both runs are train/trainer.py's :class:`Trainer` (distillation plugs in train/distill.py's objective).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist

from mlfm_scale.config import Config, load_config
from mlfm_scale.errors import ERROR_FILE, UserError
from mlfm_scale.parallel.lifeline import stop_with_parent
from mlfm_scale.train.preemption import StopRequest


def train(cfg: Config, stop: StopRequest | None = None) -> dict:
    """Run (or resume) training under ``cfg``; returns a summary (rank 0's view). When ``stop`` is requested
    (a launcher's preemption signal) the ranks stop together at a step boundary after a checkpoint, and the
    summary says ``preempted``."""
    from mlfm_scale.train.trainer import Trainer

    return Trainer(cfg, stop).run()


def sft(cfg: Config, stop: StopRequest | None = None) -> dict:
    """The SFT stage (``mlfm launch sft``): :func:`train` on a config with ``stage: sft``."""
    if cfg.stage != "sft":
        raise UserError(f"`mlfm launch sft` runs the SFT stage, but the config has stage={cfg.stage}: set stage=sft "
                        "(see configs/tiny-sft.yaml), or launch pretrain")
    return train(cfg, stop)


def distill_config(cfg: Config) -> Config:
    """The config a distillation run trains under: a flow-map student (``model.flow_map``) starting from the
    teacher's weights (``train.init_from``), for ``distill.steps`` when set. Without ``distill.teacher`` the teacher
    is the run this config trained (its checkpoint directory), and the student's run goes to ``out_dir/distill``
    (so a pipeline's later stages export and evaluate the student)."""
    cfg = cfg.model_copy(deep=True)
    if cfg.distill.teacher is None:
        cfg.distill.teacher = str(cfg.path(cfg.checkpoint.dir))
        # the data stays the teacher's run's: its paths are relative to the out_dir that is about to move
        cfg.data.root = str(cfg.path(cfg.data.root).absolute())
        for source in cfg.data.sources:
            source.path = str(cfg.path(source.path).absolute())
        cfg.out_dir = str(Path(cfg.out_dir) / "distill")
    cfg.model.flow_map = True
    cfg.train.init_from, cfg.train.init_weights = cfg.distill.teacher, cfg.distill.teacher_weights
    if cfg.distill.steps is not None:
        cfg.train.steps = cfg.distill.steps
    return cfg


def distill(cfg: Config, stop: StopRequest | None = None) -> dict:
    """Flow-map distillation (``mlfm distill``, ``mlfm launch distill``): :func:`train` on
    :func:`distill_config`'s config."""
    return train(distill_config(cfg), stop)


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--nproc", type=int, default=None,
                        help="start this many processes on this machine with torchrun (not under a launcher)")


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "mlfm_scale.cli", *argv]


def run_local(nproc: int, argv: list[str]) -> int:
    """``mlfm ARGV`` on ``nproc`` processes of this machine under torchrun; its exit code. When a rank fails,
    the last line printed is its error (ranks write it to ``MLFM_ERROR_FILE``), not torchrun's traceback."""
    with tempfile.TemporaryDirectory(prefix="mlfm-run-") as tmp:
        error_file = Path(tmp) / "error.txt"
        code = subprocess.call(torchrun_command(nproc, argv), env={**os.environ, ERROR_FILE: str(error_file)},
                               preexec_fn=stop_with_parent)
        if code:
            reason = error_file.read_text().strip() if error_file.is_file() else \
                f"a rank failed (exit {code}); its traceback is above"
            print(f"mlfm {argv[0]}: error: {reason}", file=sys.stderr, flush=True)
    return code


def run(args: argparse.Namespace, command: str = "train") -> int:
    """``mlfm train`` (or, with ``command="distill"``, ``mlfm distill``)."""
    cfg = load_config(args.config, args.overrides)
    if args.nproc and "RANK" not in os.environ:
        return run_local(args.nproc, [command, args.config, *args.overrides])
    summary = (distill if command == "distill" else train)(cfg)
    if dist.get_rank() == 0:
        s = summary["state"]
        done = "distilled" if command == "distill" else "trained"
        print(f"{done} to step {s['step']} ({s['tokens']} tokens, {s['skipped']} skipped steps, {s['rollbacks']} "
              f"rollbacks) in {summary['seconds']:.1f} s; last checkpoint: {summary['last_checkpoint']}")
    dist.destroy_process_group()
    return 0
