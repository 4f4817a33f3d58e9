"""The job kinds ``mlfm launch`` submits. Each is a registration naming an entry point, not a copy of the
launcher: ``entry(cfg)`` (or ``entry(cfg, stop=StopRequest)`` when ``preemptible``) runs on every task of
the job under torch.distributed and returns a summary dict.

A preemptible entry point stops at a step boundary with a checkpoint when its stop request is set and returns
``{"preempted": True, ...}``; it resumes through ``train.resume`` (the launcher sets ``auto``), so the requeued
job continues from ``latest``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from mlfm_scale.errors import UserError


@dataclass(frozen=True)
class JobKind:
    name: str
    entry: str  # "module:function"
    help: str
    preemptible: bool = False
    single_task: bool = False  # runs on one task whatever the launch asks (e.g. export after a multi-node run)

    def load(self) -> Callable:
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(module), function)


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
register(JobKind("export", "mlfm_scale.export:export_latest",
                 "consolidate the run's latest checkpoint into out_dir/export (what `mlfm export` writes)",
                 single_task=True))
# distill and eval: one register(...) line each when their entry points land.

# `mlfm launch pipeline` submits the registered ones of these in order, each after the previous succeeded.
PIPELINE = ("pretrain", "export", "eval")
