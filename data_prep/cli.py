"""``mlfm prep``: ``synth`` writes the synthetic demo corpus; ``corpus`` turns a corpus into MDS shards."""
from __future__ import annotations

import argparse
import json
import sys
import time

from mlfm_scale.cli import add_model_flags, model_from_flags
from mlfm_scale.config import ConfigError, DataSection, PrepSection


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    synth = sub.add_parser("synth", help="write the deterministic synthetic corpus as JSONL")
    synth.add_argument("out", help="output .jsonl file")
    synth.add_argument("--documents", type=int, default=2000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--sft", action="store_true", help='prompt/response pairs: "Story of NAME." → the story')

    corpus = sub.add_parser("corpus", help="tokenise, pack and write streaming (MDS) shards",
                            description="INPUT files or directories (JSONL, text, Parquet, SFT JSONL) → "
                            "OUT/{train,val}/ MDS shards, OUT/tokenizer/, OUT/manifest.json")
    corpus.add_argument("inputs", nargs="+", metavar="INPUT")
    corpus.add_argument("--out", required=True, help="output directory")
    corpus.add_argument("--seq-len", type=int, default=DataSection.model_fields["seq_len"].default,
                        help="tokens per packed block (default: %(default)s)")
    corpus.add_argument("--train-tokenizer", type=int, metavar="VOCAB", dest="train_vocab",
                        help="train a byte-level BPE of VOCAB ids on the corpus (the default, at --vocab-size)")
    corpus.add_argument("--overwrite", action="store_true",
                        help="replace a previous prep in OUT: only the files its manifest.json lists are removed, "
                        "once the new output is complete")
    corpus.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_flags(corpus, PrepSection)


def run(args: argparse.Namespace) -> int:
    if args.action == "synth":
        from data_prep.synth import write_synth_jsonl

        size = write_synth_jsonl(args.out, args.documents, args.seed, sft=args.sft)
        what = "prompt/response pairs" if args.sft else "documents"
        print(f"wrote {args.documents} {what} ({size / 1e6:.2f} MB) to {args.out}")
        return 0

    from data_prep.shards import prepare_shards

    if args.train_vocab is not None:
        if args.tokenizer:
            raise ConfigError("--tokenizer and --train-tokenizer exclude each other: give one")
        args.vocab_size = args.train_vocab
    opts = model_from_flags(args, PrepSection)
    started = time.perf_counter()
    manifest = prepare_shards(args.inputs, args.out, opts, args.seq_len, overwrite=args.overwrite,
                              progress=not args.no_progress)
    json.dump(manifest, sys.stdout, indent=2)
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    elapsed = time.perf_counter() - started
    print(f"\n{tokens} tokens in {elapsed:.1f} s ({tokens / elapsed:,.0f} tokens/s) → {args.out}", file=sys.stderr)
    return 0
