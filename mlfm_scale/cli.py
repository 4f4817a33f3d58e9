"""``mlfm <command> ...``: each command is a module exposing ``add_arguments(parser)`` and ``run(args)``.

Modules are imported only when their command runs, so ``mlfm --help`` stays fast (no torch import).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import types
import typing
import warnings
from typing import Literal

from pydantic import BaseModel, ValidationError

from mlfm_scale.config import ConfigError, explain
from mlfm_scale.errors import UserError, record_error

COMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("data_prep.cli", "corpus → tokenised, packed streaming shards; the synthetic demo corpus"),
    "train": ("mlfm_scale.train.loop", "pretrain an MLFM from shards (megatron TP × DeepSpeed ZeRO, or × pipeline)"),
    "distill": ("mlfm_scale.train.distill_cli", "distil a checkpoint into a flow-map student: 1–4 jumps per promotion "
                "round"),
    "convert": ("mlfm_scale.convert.cli", "SMDM, LLaDA or the reference's MLFM weights → a checkpoint to train from"),
    "export": ("mlfm_scale.export", "consolidate a sharded checkpoint into one model for inference (safetensors)"),
    "reshard": ("mlfm_scale.train.reshard", "write a checkpoint's layout-free form (resume on another layout)"),
    "demo": ("mlfm_scale.demo", "the main job on the embedded default (no downloads)"),
    "config": ("mlfm_scale.config_cli", "print a config resolved with its overrides, or say what is wrong"),
    "launch": ("launchers.cli", "submit pretrain, sft, distill, export or eval jobs, or a chain of them, to SLURM"),
    "jobs": ("launchers.jobs_cli", "this project's SLURM jobs: state and latest checkpoint step"),
    "sample": ("mlfm_scale.sample.cli", "generate from an exported model: MLFM promotion, flow or MDM sampling"),
    "eval": ("mlfm_scale.eval.cli", "evaluate a model: GSM8K, MT-Bench answers, generative perplexity, CE against γ, "
             "synthetic validity; data-parallel, per-prompt seeds"),
    "diagnose": ("mlfm_scale.diagnose", "where an exported model decides its tokens: accuracy and CE against γ"),
}


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], rename: dict | None = None,
                    exclude: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of ``model`` but ``exclude`` (type, choices and help from the schema; nested
    sections get none); defaults stay unset so :func:`model_from_flags` can tell given flags from schema defaults."""
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        flag = "--" + (rename or {}).get(name, name).replace("_", "-")
        ann = info.annotation
        union = typing.get_origin(ann) in (typing.Union, types.UnionType)
        args = [a for a in typing.get_args(ann) if a is not type(None)] if union else [ann]
        kind = args[0] if args else ann
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            continue
        help_text = f"{info.description or name} (default: {info.default})"
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(flag, dest=name, choices=typing.get_args(kind), default=None, help=help_text)
        elif words := [w for a in args if typing.get_origin(a) is Literal for w in typing.get_args(a)]:
            parser.add_argument(flag, dest=name, type=_scalar_or_word(kind, words), default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text)


def _scalar_or_word(kind: type, words: list[str]):
    """An argparse type for a field like ``float | Literal["auto"]``: one of ``words``, else ``kind(text)``."""
    def convert(text: str):
        return text if text in words else kind(text)

    convert.__name__ = f"{kind.__name__} or {' / '.join(words)}"  # argparse names it in its error message
    return convert


def model_from_flags(args: argparse.Namespace, model: type[BaseModel], base: BaseModel | None = None):
    """``base`` (or the schema defaults) with every flag the user gave applied, validated."""
    given = {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}
    merged = (base.model_dump() if base is not None else {}) | given
    try:
        return model.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(explain(e)) from None


# Known noise from the libraries under us, printed on every rank (many times per step for DeepSpeed's calls).
QUIET = (
    r".*(Transformer Engine|Apex) (and Apex are|is) not installed.*",
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated.*",
    r"full scope is deprecated.*",
    r"When using async grad allreduce.*",
    r".*tp_group is None, using default tp group.*",
    r"MLP requires ffn_hidden_size.*",
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    top = argparse.ArgumentParser(
        prog="mlfm", description="Masked Language Flow Models at scale.",
        epilog="commands:\n" + "\n".join(f"  {n:<8} {h}" for n, (_, h) in COMMANDS.items())
        + "\n\n`mlfm COMMAND --help` describes each.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    top.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if not argv:
        top.print_help()
        return 2
    ns = top.parse_args(argv[:1])
    module_name, help_text = COMMANDS[ns.command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"mlfm {ns.command}", description=help_text)
    module.add_arguments(parser)
    try:  # options may stand between positionals (`mlfm train CONFIG --nproc 2 key=value`)
        args = parser.parse_intermixed_args(argv[1:])
    except TypeError:  # commands with sub-actions (`mlfm prep synth ...`) parse the plain way
        args = parser.parse_args(argv[1:])
    try:
        return module.run(args) or 0
    except UserError as e:
        print(f"mlfm {ns.command}: error: {e}", file=sys.stderr)
        record_error(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
