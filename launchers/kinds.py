"""The job kinds ``mlfm launch`` submits. Each is a registration naming an entry point, not a copy of the
launcher: ``entry(cfg)`` (or ``entry(cfg, stop=StopRequest)`` when ``preemptible``) runs on every task of
the job under torch.distributed and returns a summary dict.

A preemptible entry point stops at a step boundary with a checkpoint when its stop request is set and returns
``{"preempted": True, ...}``; it resumes through ``train.resume`` (the launcher sets ``auto``), so the requeued
job continues from ``latest``.

A kind may also name a ``configure`` function (Config → Config): the launcher applies it to the config the
job runs and passes the result on to the later jobs of its chain (distill: the student's run in
``out_dir/distill``, which the pipeline then exports and evaluates).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from mlfm_scale.config import Config
from mlfm_scale.errors import UserError


def _load(ref: str) -> Callable:
    module, _, function = ref.partition(":")
    return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class JobKind:
    name: str
    entry: str  # "module:function"
    help: str
    preemptible: bool = False
    single_task: bool = False  # runs on one task whatever the launch asks (e.g. export after a multi-node run)
    configure: str | None = None  # "module:function", Config → Config: this job's config and the chain's after it

    def load(self) -> Callable:
        return _load(self.entry)

    def configured(self, cfg: Config) -> Config:
        """``cfg`` as this kind's ``configure`` sets it (imported only here: it may pull in torch)."""
        return _load(self.configure)(cfg) if self.configure else cfg


KINDS: dict[str, JobKind] = {}


def register(kind: JobKind) -> JobKind:
    KINDS[kind.name] = kind
    return kind


def get(name: str) -> JobKind:
    if name not in KINDS:
        raise UserError(f"unknown job kind {name!r}; registered kinds: {', '.join(KINDS)} (and 'pipeline')")
    return KINDS[name]


register(JobKind("pretrain", "mlfm_scale.train.loop:train", "pretrain an MLFM (what `mlfm train` runs)",
                 preemptible=True))
register(JobKind("sft", "mlfm_scale.train.loop:sft",
                 "the SFT stage: prompt/response shards, from train.init_from's weights (stage: sft)",
                 preemptible=True))
register(JobKind("distill", "mlfm_scale.train.loop:distill",
                 "distil a flow-map student from distill.teacher (default: this config's run) into out_dir/distill",
                 preemptible=True, configure="mlfm_scale.train.loop:distill_config"))
register(JobKind("export", "mlfm_scale.export:export_latest",
                 "consolidate the run's latest checkpoint into out_dir/export (what `mlfm export` writes)",
                 single_task=True))
register(JobKind("eval", "mlfm_scale.eval.cli:evaluate",
                 "evaluate the run's export (eval.model; default out_dir/export): eval.tasks, data-parallel over "
                 "the job's tasks"))

# `mlfm launch pipeline` submits the registered ones of these in order, each after the previous succeeded.
PIPELINE = ("pretrain", "distill", "export", "eval")


def pipeline(skip: list[str] | tuple[str, ...] = ()) -> list[JobKind]:
    """The registered stages of :data:`PIPELINE` but ``skip`` (``mlfm launch pipeline --skip KIND``)."""
    stages = [name for name in PIPELINE if name in KINDS]
    unknown = [name for name in skip if name not in stages]
    if unknown:
        raise UserError(f"--skip {unknown[0]}: not a registered stage of the pipeline (stages: {', '.join(stages)})")
    kinds = [KINDS[name] for name in stages if name not in skip]
    if not kinds:
        raise UserError(f"--skip leaves no stage of the pipeline ({', '.join(stages)}) to submit")
    return kinds
