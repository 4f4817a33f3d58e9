"""``mlfm sample --model EXPORT_DIR --prompt TEXT ... | --prompts-file JSONL | --unconditional N``.

Writes one JSON line per prompt (stdout, or ``--out``): the prompt, the generated text and token ids, NFE, rounds,
where the trajectories ended (``gamma_min`` and its source) and the wall time of its batch. Sampler settings
default to the export's ``generation_config.json``; every one can be overridden by its flag (``--steps 64 --method
mdm``). Batch i is sampled with the generator seeded ``seed + i``, so a run repeats exactly with the same prompts,
batch size and seed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from mlfm_scale.cli import add_model_flags, model_from_flags
from mlfm_scale.config import ConfigError, SampleSection, explain
from mlfm_scale.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="export directory written by `mlfm export`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for a batch; '' for unconditional)")
    source.add_argument("--prompts-file", help="JSONL with one object per line holding the prompt text")
    source.add_argument("--unconditional", type=int, metavar="N", help="N samples without a prompt")
    parser.add_argument("--prompt-field", default="prompt", help="field of --prompts-file (default: %(default)s)")
    parser.add_argument("--out", help="JSONL output file (default: stdout)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: as exported")
    parser.add_argument("--history", action="store_true", help="add each sample's promotion rounds to its line")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    add_model_flags(parser, SampleSection)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompt texts from whichever source was given; file errors name the file and line."""
    if args.prompt is not None:
        return list(args.prompt)
    if args.unconditional is not None:
        if args.unconditional < 1:
            raise UserError(f"--unconditional needs a positive count, got {args.unconditional}")
        return [""] * args.unconditional
    path = Path(args.prompts_file)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: malformed JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(args.prompt_field), str):
            raise UserError(f"{path}:{number}: expected an object with a text field {args.prompt_field!r} "
                            "(choose the field with --prompt-field)")
        prompts.append(record[args.prompt_field])
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def sampler_options(generation_config: dict, args: argparse.Namespace) -> SampleSection:
    """The export's generation config with the given flags applied, validated."""
    try:
        base = SampleSection.model_validate(generation_config)
    except ValidationError as e:
        raise ConfigError(f"generation_config.json of the export: {explain(e)}") from None
    return model_from_flags(args, SampleSection, base)


def run(args: argparse.Namespace) -> int:
    export = Path(args.model)
    if not (export / "config.json").is_file():
        raise UserError(f"no exported model at {export} (config.json missing): run `mlfm export CHECKPOINT {export}`")
    prompts = read_prompts(args)
    if args.out and not Path(args.out).parent.is_dir():
        raise UserError(f"--out {args.out}: directory {Path(args.out).parent} does not exist")
    generation = export / "generation_config.json"  # bad flag values fail before the model loads
    cfg = sampler_options(json.loads(generation.read_text()) if generation.is_file() else {}, args)

    import torch

    from mlfm_scale.inference import MLFMForInference
    from mlfm_scale.sample.sampler import generate

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    model = MLFMForInference.from_pretrained(export, device=args.device, dtype=dtype)
    tokenizer = model.tokenizer()
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    out = Path(args.out).open("w", encoding="utf-8") if args.out else sys.stdout
    try:
        for batch, start in enumerate(range(0, len(prompts), cfg.batch_size)):
            texts = prompts[start:start + cfg.batch_size]
            ids = [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
            generator = torch.Generator(device=args.device).manual_seed(cfg.seed + batch)
            began = time.perf_counter()
            result = generate(model, ids, cfg, generator, history=args.history, progress=progress)
            seconds = time.perf_counter() - began
            for i, (text, tokens) in enumerate(zip(texts, result.generated)):
                line = {"index": start + i, "prompt": text, "text": tokenizer.decode(tokens, skip_special_tokens=True),
                        "token_ids": tokens, "nfe": int(result.nfe[i]), "rounds": int(result.rounds[i]),
                        "seconds": seconds, "batch_size": len(texts), "method": cfg.method, "steps": cfg.steps,
                        "gamma_min": result.gamma_min, "gamma_min_source": result.gamma_min_source}
                if args.history:
                    line["history"] = result.history[i]
                out.write(json.dumps(line) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
