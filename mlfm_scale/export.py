"""``mlfm export CHECKPOINT OUT_DIR``: one consolidated model for inference from a sharded checkpoint.

Reads any supported layout (TP × ZeRO-1/2/3) on the CPU without a process group (train/universal.py),
removes the vocabulary padding and writes Hugging Face-style files that ``mlfm_scale.inference`` loads:

    model.safetensors                or model-0000x-of-0000y.safetensors + model.safetensors.index.json
    config.json                      architecture, vocabulary and special ids, σ, the γ schedule and learned curve
    generation_config.json           the sampler defaults (config ``sample`` section)
    tokenizer.json                   copied from the data manifest's tokenizer

Every checkpoint file is verified against ``checkpoint.json`` first, so a truncated or modified shard is refused.
The export is written to ``OUT_DIR.tmp``, fsynced and then swapped into place (durable.py): a crash or a kill at
any point leaves the previous export or the new one complete, and the next export cleans up after it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from pydantic import ValidationError

from mlfm_scale.config import Config, ConfigError, LoRASection, explain
from mlfm_scale.durable import publish_dir, recover_dir, staging
from mlfm_scale.errors import UserError
from mlfm_scale.inference.model import (
    ADAPTER_CONFIG,
    ADAPTERS,
    CONFIG,
    DTYPES,
    GENERATION_CONFIG,
    TOKENIZER,
    WEIGHTS,
    WEIGHTS_INDEX,
    curve_to_json,
)
from mlfm_scale.model.common import merge_adapters

SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
VOCAB_ROWS = ("embedding.weight", "output_layer.weight", "output_layer.lora.b")  # V_pad rows in training, V exported


def export_tensors(full: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Canonical full tensors (train/universal.py) → the export's: vocabulary padding rows removed."""
    return {n: t[:vocab_size].clone() if n in VOCAB_ROWS else t for n, t in full.items()}


def merged(full: dict[str, torch.Tensor], lora: LoRASection) -> dict[str, torch.Tensor]:
    """``full`` with its LoRA adapters folded into their base weights (model/common.py ``merge_adapters``)."""
    merge_adapters(full, full, lora)
    return full


def trained_tensors(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a LoRA run trains (adapters, AdaLN and the γ MLPs): the adapter file written beside a base."""
    from mlfm_scale.train.engine import role

    return {n: t for n, t in full.items() if role(n) != "base"}


def export_config(cfg: Config, tokenizer: dict, client: dict, table: torch.Tensor, source: Path, weights: str,
                  dtype: str) -> dict:
    """config.json: what ``MLFMForInference`` and the sampler need (the shared inference interface), with the
    input table's per-dimension RMS (what σ and γ are measured against) and the run's last decision profile."""
    from mlfm_scale.train.manager import components

    state = components(client)
    curve = state.get("objective", {}).get("curve")  # none in a converted checkpoint
    return {"architecture": "MLFM", "model": cfg.model.model_dump(mode="json"),
            "objective": cfg.objective.model_dump(mode="json"),
            "gamma_curve": None if curve is None else curve_to_json(curve),
            "embedding_rms": float(table.double().square().mean().sqrt()), "decision": state.get("decision"),
            "vocab_size": cfg.model.vocab_size or tokenizer["vocab_size"], "mask_id": tokenizer["mask_id"],
            "eos_id": tokenizer["eos_id"], "pad_id": tokenizer["pad_id"], "seq_len": cfg.data.seq_len,
            "sigma": cfg.objective.sigma, "source_checkpoint": str(source), "weights": weights, "dtype": dtype,
            # a flow-map student distilled from a guided teacher carries that guidance in its weights
            "distilled_guidance": cfg.distill.guidance_scale if cfg.distill.teacher else None}


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype,
                      max_shard_bytes: int) -> list[str]:
    """Write ``tensors`` cast to ``dtype``: one ``model.safetensors``, or shards of at most ``max_shard_bytes``
    (a larger tensor gets a shard of its own) with an index. Casts one shard at a time. Returns the file names."""
    from safetensors.torch import save_file

    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = [WEIGHTS] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(len(shards))]
    for file, shard in zip(names, shards):
        save_file({n: tensors[n].to(dtype).contiguous() for n in shard}, out_dir / file, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * dtype.itemsize for t in tensors.values())},
                 "weight_map": {n: file for file, shard in zip(names, shards) for n in shard}}
        (out_dir / WEIGHTS_INDEX).write_text(json.dumps(index, indent=1))
    return names


def tokenizer_of(cfg: Config, manifest_hash: str) -> tuple[dict, Path]:
    """(the manifest's tokenizer entry, its tokenizer.json) for the data a checkpoint was trained on."""
    from mlfm_scale.data.loader import data_fingerprint, source_dirs
    from mlfm_scale.data.manifest import read_manifest

    root = source_dirs(cfg)[0][0]
    manifest = read_manifest(root)
    if data_fingerprint(cfg) != manifest_hash:
        raise UserError(f"the data manifest under {root} is not the one the checkpoint was trained on (its hash "
                        "differs): export where the training data is, or restore the original manifest")
    return manifest["tokenizer"], root / manifest["tokenizer"]["file"]


def _written_by_export(name: str) -> bool:
    return (name in (WEIGHTS, WEIGHTS_INDEX, CONFIG, GENERATION_CONFIG, TOKENIZER, ADAPTERS, ADAPTER_CONFIG)
            or bool(SHARD.fullmatch(name)))


def export(checkpoint: Path, out_dir: Path, weights: str | None = None, dtype: str = "fp32",
           max_shard_bytes: int = 2 << 30, overwrite: bool = False, adapters_only: bool = False) -> dict:
    """Consolidate ``checkpoint`` (a tag directory) into ``out_dir``; returns a summary with the peak RSS.
    LoRA adapters are merged into their base weights, or with ``adapters_only`` written alone (what the run
    trained: adapters and AdaLN) for ``MLFMForInference.from_pretrained(BASE, adapters=OUT_DIR)``."""
    from safetensors.torch import save_file

    from mlfm_scale.train.universal import open_checkpoint

    started = time.perf_counter()
    out_dir = out_dir.absolute()  # its staging sibling needs a name (OUT_DIR may be ".")
    for line in recover_dir(out_dir):
        print(f"WARNING: {line}", file=sys.stderr, flush=True)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{out_dir} is not empty: choose another OUT_DIR or pass --overwrite")
        if foreign := sorted(p.name for p in out_dir.iterdir() if not _written_by_export(p.name)):
            raise UserError(f"{out_dir} holds files an export does not write ({', '.join(foreign[:5])}), and "
                            "--overwrite replaces the whole directory: move them, or choose another OUT_DIR")
    reader = open_checkpoint(checkpoint)
    client = reader.client_state()
    try:
        cfg = Config.model_validate(client["config"])
    except ValidationError as e:
        raise ConfigError(f"{checkpoint}: its stored config does not fit this version's schema ({explain(e)}); "
                          "export it with the mlfm-scale version that trained it") from None
    if client["manifest_sha256"] is None:
        raise UserError(f"{checkpoint} was converted without prepared data, so it has no tokenizer to export: "
                        "prepare a corpus with the model's tokenizer (mlfm prep corpus ... --tokenizer) and run "
                        "`mlfm convert` again with data.root pointing at it")
    tokenizer, tokenizer_file = tokenizer_of(cfg, client["manifest_sha256"])
    adapted = cfg.model.lora.enabled
    if adapters_only and not adapted:
        raise UserError(f"{checkpoint} has no LoRA adapters (model.lora.rank=0): export the whole model")
    if adapters_only and (cfg.train.base_lr is not None or cfg.train.trainable):
        raise UserError(f"{checkpoint} trained base weights too (train.base_lr / train.trainable), which an "
                        "adapter file leaves out: export the whole model (--merge-lora)")
    weights = weights or ("ema" if reader.has_ema() else "raw")
    if weights == "ema" and not reader.has_ema():
        raise UserError(f"{checkpoint} holds no EMA weights: export with --weights raw")
    kind = "ema" if weights == "ema" else "param"
    full = reader.read([kind])[kind]
    vocab_size = cfg.model.vocab_size or tokenizer["vocab_size"]
    table = full["embedding.weight"][:vocab_size]
    tensors = export_tensors(trained_tensors(full) if adapters_only else merged(full, cfg.model.lora), vocab_size)
    config = export_config(cfg, tokenizer, client, table, checkpoint, weights, dtype)
    if adapted and not adapters_only:  # a plain model: the adapters are in the weights
        config["merged_lora"] = config["model"]["lora"]
        config["model"]["lora"] = LoRASection().model_dump(mode="json")
    del full, table
    staged = staging(out_dir)
    staged.mkdir(parents=True)
    try:
        if adapters_only:
            save_file({n: t.to(DTYPES[dtype]).contiguous() for n, t in tensors.items()}, staged / ADAPTERS)
            (staged / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))
            files = [ADAPTERS, ADAPTER_CONFIG]
        else:
            files = write_safetensors(tensors, staged, DTYPES[dtype], max_shard_bytes)
            (staged / CONFIG).write_text(json.dumps(config, indent=1))
        (staged / GENERATION_CONFIG).write_text(json.dumps(cfg.sample.model_dump(mode="json"), indent=1))
        shutil.copyfile(tokenizer_file, staged / TOKENIZER)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    publish_dir(out_dir)
    return {"files": files, "parameters": sum(t.numel() for t in tensors.values()),
            "model_bytes": sum(t.numel() * DTYPES[dtype].itemsize for t in tensors.values()),
            "fp32_model_bytes": sum(t.numel() * 4 for t in tensors.values()),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds": time.perf_counter() - started, "weights": weights}


def export_latest(cfg: Config) -> dict:
    """The ``export`` job kind (``mlfm launch export``, or chained after ``pretrain``): the run's ``latest``
    checkpoint → ``out_dir/export`` (EMA weights when present, fp32), written by the job's first task."""
    from mlfm_scale.train.checkpoint import resolve

    if int(os.environ.get("RANK", "0")):
        return {"exported_by": 0}
    ckpt_dir = cfg.path(cfg.checkpoint.dir)
    found = resolve(str(ckpt_dir))
    summary = export(found[0] / found[1], Path(cfg.out_dir) / "export", overwrite=True)
    print(f"exported {found[0] / found[1]} to {Path(cfg.out_dir) / 'export'}: {', '.join(summary['files'])}",
          flush=True)
    return summary


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint tag directory (…/stepNNNNNNNN) or a checkpoint directory "
                        "holding `latest`")
    parser.add_argument("out_dir", help="where to write the export")
    parser.add_argument("--weights", choices=("ema", "raw"), default=None, help="EMA or raw weights "
                        "(default: EMA when the checkpoint has it)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of the written weights")
    parser.add_argument("--max-shard-mb", type=int, default=2048, help="split model.safetensors above this size")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    lora_mode = parser.add_mutually_exclusive_group()
    lora_mode.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights: a plain "
                           "model (the default for a checkpoint with adapters)")
    lora_mode.add_argument("--adapters-only", action="store_true", help="write only what a LoRA run trained "
                           "(adapters, AdaLN) as adapters.safetensors, loaded onto a base export with "
                           "MLFMForInference.from_pretrained(BASE, adapters=OUT_DIR)")


def run(args: argparse.Namespace) -> int:
    from mlfm_scale.train.checkpoint import resolve

    ckpt_dir, tag = resolve(args.checkpoint, what="CHECKPOINT")
    summary = export(ckpt_dir / tag, Path(args.out_dir), args.weights, args.dtype, args.max_shard_mb << 20,
                     args.overwrite, args.adapters_only)
    print(f"exported {ckpt_dir / tag} ({summary['weights']} weights, {summary['parameters']} parameters, "
          f"{summary['model_bytes'] / 2**20:.1f} MiB {args.dtype}) to {args.out_dir} in {summary['seconds']:.1f} s: "
          f"{', '.join(summary['files'])}; peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB")
    return 0
