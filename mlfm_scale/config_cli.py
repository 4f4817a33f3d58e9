"""``mlfm config CONFIG [key=value ...]``: print the resolved config as YAML, or what is wrong with it."""
from __future__ import annotations

import argparse

from mlfm_scale.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML file (default: the schema defaults)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4")


def run(args: argparse.Namespace) -> int:
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0
