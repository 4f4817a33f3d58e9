"""``mlfm convert FORMAT SRC OUT --config CONFIG.yaml [overrides]``: a pretrained MDM (or the reference's MLFM
adapters) → a step-0 checkpoint that ``mlfm train`` starts from (``train.init_from=OUT``, any layout) and
``mlfm export`` reads.

The architecture comes from the config's ``model:`` section, checked against the checkpoint; the vocabulary
and mask id come from the checkpoint and, when the config's data is prepared, are checked against its
tokenizer (the export takes its tokenizer from there)."""
from __future__ import annotations

import argparse
import hashlib
import resource
import time
from pathlib import Path

from mlfm_scale.errors import UserError


def source_record(src: Path) -> dict:
    """Where the weights came from: the path, and each file's size and modification time (hashing a
    many-GiB checkpoint would double the conversion's time)."""
    files = sorted([src] if src.is_file() else [p for p in src.iterdir() if p.is_file()])
    listing = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    return {"source": str(src.absolute()), "files": len(files), "bytes": sum(size for _, size, _ in listing),
            "listing_sha256": hashlib.sha256(repr(listing).encode()).hexdigest()}


def data_check(cfg, vocab_size: int, mask_id: int) -> str | None:
    """The data fingerprint of ``cfg``'s prepared data after checking its tokenizer against the checkpoint's
    vocabulary; None when no data is prepared there."""
    from mlfm_scale.data.loader import data_fingerprint, load_manifest, source_dirs
    from mlfm_scale.data.manifest import MANIFEST_FILE

    if not all((d / MANIFEST_FILE).is_file() for d, _ in source_dirs(cfg)):
        return None
    tok = load_manifest(cfg)["tokenizer"]
    if (tok["vocab_size"], tok["mask_id"]) != (vocab_size, mask_id):
        raise UserError(f"the data under {cfg.data.root} was tokenised with {tok['vocab_size']} ids (mask id "
                        f"{tok['mask_id']}), the checkpoint has {vocab_size} (mask id {mask_id}): prepare it with "
                        "the model's own tokenizer (mlfm prep corpus ... --tokenizer TOKENIZER.json)")
    return data_fingerprint(cfg)


def convert(fmt: str, src: Path, out: Path, cfg, overwrite: bool = False) -> dict:
    """Convert ``src`` (format ``fmt``) into the checkpoint directory ``out``; returns a summary."""
    from mlfm_scale.convert.checkpoint import write_converted
    from mlfm_scale.convert.formats import plan_for
    from mlfm_scale.durable import recover_dir

    started = time.perf_counter()
    out = out.absolute()
    recover_dir(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty: choose another OUT or pass --overwrite (it replaces the directory)")
    plan = plan_for(fmt, cfg.model, src)
    data_hash = data_check(cfg, plan.vocab_size, plan.mask_id)
    tag_dir = write_converted(cfg, plan, out, {"format": fmt, **source_record(src)}, data_hash)
    return {"checkpoint": str(tag_dir), "tensors": len(plan.entries), "vocab_size": plan.vocab_size,
            "mask_id": plan.mask_id, "tokenizer_checked": data_hash is not None,
            "seconds": time.perf_counter() - started,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mlfm_scale.convert.formats import FORMATS

    parser.add_argument("format", choices=sorted(FORMATS), help="the checkpoint's format")
    parser.add_argument("src", help="a safetensors file, or a directory of shards (LLaDA: with config.json); "
                        "mlfm-reference: its checkpoint .pt, the SMDM base safetensors beside it")
    parser.add_argument("out", help="the checkpoint directory to write (then train.init_from=OUT)")
    parser.add_argument("--config", required=True, help="the run's config (its model: section is the "
                        "architecture, e.g. configs/smdm-1028m.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")


def run(args: argparse.Namespace) -> int:
    from mlfm_scale.config import load_config

    cfg = load_config(args.config, args.overrides)
    summary = convert(args.format, Path(args.src), Path(args.out), cfg, args.overwrite)
    checked = "checked against the data's tokenizer" if summary["tokenizer_checked"] else (
        "not checked: no prepared data at data.root, so `mlfm export` of it needs a conversion with data")
    print(f"converted {args.src} ({args.format}, vocabulary {summary['vocab_size']}, mask id {summary['mask_id']}; "
          f"{checked}) into {summary['checkpoint']} in {summary['seconds']:.1f} s, peak RSS "
          f"{summary['peak_rss_bytes'] / 2**20:.0f} MiB; train from it with train.init_from={args.out}")
    return 0
