"""``mlfm eval TASK [TASK ...] --model EXPORT --out DIR [--limit N] [--steps 8 32 256] [--nproc N] ...``;
``mlfm eval gsm8k --score-only FILE --out DIR`` re-scores completions without a model.

Tasks: eval/tasks.py. ``--model`` is an export, or a checkpoint (directory with ``latest``, or a tag), exported
first. ``--nproc N`` runs N data-parallel ranks here under torchrun (SLURM: ``mlfm launch eval``); results are the
same for any N and batch size (eval/runner.py). Writes ``DIR/metrics.json``, ``DIR/metrics.jsonl`` (and wandb with
``--wandb``) and each task's files under ``DIR/[stepsN/]TASK/``, and prints a summary table.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from mlfm_scale.cli import add_model_flags, model_from_flags
from mlfm_scale.config import EVAL_TASKS, Config, EvalSection, LogSection
from mlfm_scale.errors import UserError


def evaluate(cfg: Config) -> dict:
    """The eval job (``mlfm eval``, ``mlfm launch eval``): ``cfg.eval``'s tasks over the model, each sampled task
    at its protocol setting or at each of ``eval.steps``; returns the results rows (rank 0; [] elsewhere)."""
    from mlfm_scale.eval.runner import EvalContext, plot_sweep, record_results
    from mlfm_scale.eval.tasks import SAMPLED, TASKS
    from mlfm_scale.train.metrics import MetricsLogger

    ctx = EvalContext.open(cfg)
    results = []
    for task in cfg.eval.tasks:
        for steps in (cfg.eval.steps if cfg.eval.steps and task in SAMPLED else [None]):
            row = TASKS[task](ctx, steps)
            if row is not None:
                results.append(row)
    if ctx.rank == 0:
        logger = MetricsLogger(cfg, ctx.out, enabled=True)
        record_results(ctx.out, results, logger)
        logger.close()
        plot_sweep(ctx.out, results)
        print(f"results in {ctx.out}", flush=True)
    return {"results": results}


def score_only(path: Path, out: Path) -> dict:
    """GSM8K completions re-scored without a model: ``path`` holds ``{"index": i, "completion": ...}`` lines."""
    from mlfm_scale.eval.gsm8k import GSM8K_FILE, load_problems, read_completions, score, write_results

    problems = load_problems(GSM8K_FILE)
    records, metrics = score(problems, read_completions(path, len(problems)))
    folder = write_results(out, records, metrics)
    print(f"gsm8k: {metrics['n']} scored, accuracy strict {metrics['accuracy_strict']:.4f}, flexible "
          f"{metrics['accuracy_flexible']:.4f} (no answer: {metrics['no_answer_strict']} strict, "
          f"{metrics['no_answer_flexible']} flexible); {folder}")
    return metrics


# ---------------------------------------------------------------------------------------------- CLI
SEPARATE = ("tasks", "model", "out", "steps")  # not the schema's one flag per field: positional, lists


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tasks", nargs="+", choices=EVAL_TASKS, metavar="TASK",
                        help=f"one or more of: {', '.join(EVAL_TASKS)}")
    parser.add_argument("--model", help="an export directory, or a checkpoint directory or tag (exported first)")
    parser.add_argument("--out", required=True, help="results directory")
    parser.add_argument("--score-only", metavar="FILE", help="gsm8k: re-score the completions in FILE "
                        '(JSONL lines {"index": i, "completion": "..."}) without a model')
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="sampler steps to sweep, e.g. 8 32 256 "
                        "(default: each task's protocol setting)")
    parser.add_argument("--nproc", type=int, default=None, help="run this many data-parallel ranks here (torchrun)")
    parser.add_argument("--wandb", action="store_true", help="also log the results to wandb (offline)")
    add_model_flags(parser, EvalSection, exclude=SEPARATE)


def argv_of(args: argparse.Namespace) -> list[str]:
    """``mlfm eval`` arguments for the ranks torchrun starts (all but ``--nproc``)."""
    argv = ["eval", *args.tasks, "--model", args.model, "--out", args.out, *(["--wandb"] if args.wandb else [])]
    for name in EvalSection.model_fields:
        value = getattr(args, name, None)
        if name not in ("tasks", "model", "out") and value is not None:
            argv += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def run(args: argparse.Namespace) -> int:
    if args.score_only:
        if args.tasks != ["gsm8k"] or args.model:
            raise UserError("--score-only re-scores GSM8K completions without a model: `mlfm eval gsm8k "
                            "--score-only FILE --out DIR`")
        score_only(Path(args.score_only), Path(args.out))
        return 0
    if not args.model:
        raise UserError("--model is required: an export directory, or a checkpoint directory or tag")
    if args.nproc and "RANK" not in os.environ:
        from mlfm_scale.train.loop import run_local

        return run_local(args.nproc, argv_of(args))
    section = model_from_flags(args, EvalSection)
    section.out = "."  # --out is the run's directory itself
    cfg = Config(name=f"eval-{Path(args.model).resolve().name}", out_dir=args.out, eval=section,
                 log=LogSection(wandb=args.wandb))
    import torch.distributed as dist

    ours = not dist.is_initialized()  # a caller's process group (a test's) is left to it
    evaluate(cfg)
    if ours and dist.is_initialized():
        dist.destroy_process_group()
    return 0
