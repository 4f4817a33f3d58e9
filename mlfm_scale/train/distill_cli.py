"""``mlfm distill CONFIG distill.teacher=CHECKPOINT_DIR [key=value ...] [--nproc N]``: flow-map distillation
of an MLFM checkpoint into a few-step student (train/distill.py), on the training loop of train/loop.py."""
from __future__ import annotations

import argparse

from mlfm_scale.train import loop

add_arguments = loop.add_arguments


def run(args: argparse.Namespace) -> int:
    return loop.run(args, command="distill")
