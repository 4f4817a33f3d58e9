"""``mlfm demo``: the main job on the embedded default — no downloads, data and tokenizer made here.

Now: synthesise the demo corpus, train its tokenizer, write streaming shards, print the manifest.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mlfm_scale.config import load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. out_dir=runs/x")


def run(args: argparse.Namespace) -> int:
    from data_prep.shards import prepare_shards
    from data_prep.synth import write_synth_jsonl

    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()
    corpus = cfg.path("corpus/synth.jsonl")
    size = write_synth_jsonl(corpus, cfg.data.synth.documents, cfg.data.synth.seed)
    print(f"[demo] synthetic corpus: {cfg.data.synth.documents} documents, {size / 1e6:.2f} MB → {corpus}")
    data_dir = cfg.path(cfg.data.root)
    manifest = prepare_shards([corpus], data_dir, cfg.data.prep, cfg.data.seq_len, overwrite=True)
    print(json.dumps(manifest, indent=2))
    print(f"[demo] shards, tokenizer and manifest → {data_dir} ({time.perf_counter() - started:.1f} s)")
    return 0
