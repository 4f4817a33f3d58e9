"""Corpus → tokenised, packed mosaicml-streaming (MDS) shards, with N worker processes.

The main process reads the inputs in order and groups them into chunks of about ``chunk_bytes`` (JSONL lines
unparsed). Each chunk is parsed, tokenised (pieces cached, see ``PieceCachedEncoder``), split train/val by a
hash of each document, packed, and written by one worker to
``OUT/{split}/cNNNNNN/``. Chunks depend only on the input, so the shards are identical for any worker
count. When every chunk is written the per-split indexes are merged in chunk order and ``manifest.json``
is written last, listing every file the prep wrote.

The prep writes into a hidden sibling ``.OUT.tmp-PID-*`` and moves its files into ``OUT`` only when it is
complete: a prep that fails while it writes leaves ``OUT`` as it was (a killed one leaves that sibling
behind); one killed during the final swap leaves ``OUT`` without a manifest, which training refuses. Replacing
a previous prep (``--overwrite``) removes only the files its manifest lists; inputs and a tokenizer inside
``OUT`` are refused.

    OUT/manifest.json  OUT/tokenizer/tokenizer.json  OUT/train/index.json  OUT/val/index.json  …
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np

from data_prep.packing import Blocks, pack_documents, pack_sft
from data_prep.readers import ReadStats, Record, Unit, list_inputs, parse_units, read_records, read_units
from data_prep.tokenizer import (
    TOKENIZER_FILE,
    PieceCachedEncoder,
    ensure_special_tokens,
    load_tokenizer,
    tokenizer_sha256,
    train_bpe,
)
from mlfm_scale import __version__
from mlfm_scale.config import PrepSection
from mlfm_scale.data.manifest import FORMAT, MANIFEST_FILE, VERSION, ManifestError, read_manifest, write_manifest
from mlfm_scale.errors import UserError

SPLITS = ("train", "val")
COUNTS = ("documents", "tokens", "blocks", "padding")


class PrepError(UserError):
    """A prep request that cannot run as given (output directory, options)."""


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def mds_columns(kind: str, seq_len: int, dtype: str) -> dict[str, str]:
    columns = {"tokens": f"ndarray:{dtype}:{seq_len}", "doc_starts": "ndarray:int32", "length": "int32",
               "block_id": "int64"}
    if kind == "sft":
        columns["response_mask"] = f"ndarray:uint8:{seq_len}"
    return columns


def is_validation(record: Record, val_fraction: float) -> bool:
    """Deterministic split by content hash: identical documents always land in the same split."""
    text = record if isinstance(record, str) else record[0] + "\x00" + record[1]
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


def chunk_units(units: Iterable[Unit], chunk_bytes: int) -> Iterator[list[Unit]]:
    """Consecutive groups of units holding about ``chunk_bytes`` of input each (bytes of a JSONL line,
    characters of a text or Parquet document)."""
    chunk, size = [], 0
    for unit in units:
        chunk.append(unit)
        size += len(unit)
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# --------------------------------------------------------------------------------------- the worker
_worker: dict = {}


def _init_worker(tokenizer_json: str, opts: PrepSection, settings: dict) -> None:
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: scale with --workers
    logging.getLogger("streaming").setLevel(logging.ERROR)
    _worker.update(settings, opts=opts, encoder=PieceCachedEncoder(Tokenizer.from_str(tokenizer_json)))


def _encode(texts: list[str]) -> list[list[int]]:
    return _worker["encoder"].encode(texts)


def _pack(records: list[Record]) -> tuple[Blocks, int]:
    w = _worker
    if w["kind"] == "sft":
        prompts, responses = _encode([r[0] for r in records]), _encode([r[1] for r in records])
        return pack_sft(list(zip(prompts, responses)), w["seq_len"], w["eos"], np.dtype(w["dtype"]))
    return pack_documents(_encode(records), w["seq_len"], w["eos"], w["pad"], np.dtype(w["dtype"])), 0


def _write(blocks: Blocks, directory: Path, chunk_id: int) -> int:
    """Write ``blocks`` as one MDS partition; returns the number of shard files."""
    from streaming import MDSWriter

    w = _worker
    compression = None if w["compression"] == "none" else w["compression"]
    with MDSWriter(out=str(directory), columns=w["columns"], compression=compression,
                   size_limit=w["shard_size_limit"]) as writer:
        for i in range(len(blocks)):
            sample = {"tokens": blocks.tokens[i], "doc_starts": blocks.doc_starts[i],
                      "length": int(blocks.lengths[i]), "block_id": (chunk_id << 32) | i}
            if blocks.response_mask is not None:
                sample["response_mask"] = blocks.response_mask[i]
            writer.write(sample)
    return sum(1 for f in directory.iterdir() if f.name.startswith("shard."))


def _process_chunk(chunk_id: int, units: list[Unit]) -> dict:
    """Parse, tokenise, split, pack and write one chunk; returns its counts per split and its read counts."""
    w = _worker
    read = ReadStats()
    records = list(parse_units(units, w["opts"], read))
    stats: dict = {"too_long": 0, "read": (read.documents, read.empty, read.bad, read.utf8_replaced)}
    val = [is_validation(r, w["val_fraction"]) for r in records]
    for split in SPLITS:
        part = [r for r, v in zip(records, val) if v == (split == "val")]
        counts = dict.fromkeys(COUNTS, 0) | {"shards": 0}
        if part:
            blocks, too_long = _pack(part)
            stats["too_long"] += too_long
            real = int(blocks.lengths.sum())
            counts.update(documents=len(part) - too_long, blocks=len(blocks), tokens=real,
                          padding=len(blocks) * w["seq_len"] - real)
            if len(blocks):
                counts["shards"] = _write(blocks, Path(w["out"]) / split / f"c{chunk_id:06d}", chunk_id)
        stats[split] = counts
    return stats


# ------------------------------------------------------------------------------- the output directory
def _inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` is ``directory`` or lies under it, symlinks and relative parts resolved."""
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def _check_sources_outside(out: Path, files: list[Path], tokenizer: str | None) -> None:
    for f in files:
        if _inside(f, out):
            raise PrepError(f"input {f} lies inside the output directory {out}, which the prep replaces: move "
                            "the input out of it or choose another --out")
    if tokenizer and _inside(Path(tokenizer), out):
        raise PrepError(f"--tokenizer {tokenizer} lies inside the output directory {out}, which the prep "
                        "replaces: copy the tokenizer out of it or choose another --out")


def _previous_files(out: Path, overwrite: bool) -> list[str]:
    """The files (relative paths, manifest first) of the previous prep that ``out`` holds, which this prep
    replaces; [] when ``out`` is absent or empty."""
    if out.exists() and not out.is_dir():
        raise PrepError(f"--out {out} is a file, not a directory: choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return []
    try:
        listed = read_manifest(out)["files"]
    except (ManifestError, KeyError):  # not a prep's output, or one from before manifests listed their files
        raise PrepError(f"output directory {out} is not empty and has no {MANIFEST_FILE} listing a previous "
                        "prep's files, so nothing in it is known to be safe to replace: choose another --out, "
                        "or empty the directory yourself") from None
    if not overwrite:
        raise PrepError(f"output directory {out} holds a previous prep; pass --overwrite to replace it (only "
                        f"the {len(listed)} files its {MANIFEST_FILE} lists are removed) or choose another --out")
    for rel in listed:
        if not isinstance(rel, str) or PurePosixPath(rel).is_absolute() or not _inside(out / rel, out):
            raise PrepError(f"{out / MANIFEST_FILE} lists {rel!r}, which is not a file inside {out}: the "
                            "manifest is damaged; empty the directory yourself or choose another --out")
    return [MANIFEST_FILE, *listed]


def _swap_in(tmp: Path, out: Path, previous: list[str]) -> None:
    """Replace the ``previous`` files in ``out`` by the complete output in ``tmp``. The old manifest goes
    first and the new one last, so ``out`` never holds a manifest that claims files it lacks."""
    new = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    new.remove(MANIFEST_FILE)
    replaced = set(previous)
    for rel in new:
        if (out / rel).exists() and rel not in replaced:
            raise PrepError(f"{out / rel} was not written by a previous prep and would be overwritten: move it "
                            "away or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for rel in previous:
        (out / rel).unlink(missing_ok=True)
    for rel in new:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, out / rel)
    os.replace(tmp / MANIFEST_FILE, out / MANIFEST_FILE)
    # the previous prep's directories that no new file reuses (chunks it had beyond this prep's)
    dirs = {out / d for rel in previous for d in PurePosixPath(rel).parents if d != PurePosixPath(".")}
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


# ---------------------------------------------------------------------------------------- the driver
def _texts(records: Iterable[Record]) -> Iterator[str]:
    for r in records:
        yield from ((r,) if isinstance(r, str) else r)


def _merge_split(out: Path, split: str, chunk_ids: list[int]) -> None:
    from streaming.base.util import merge_index

    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # merge_index warns about its temporary folder
    try:
        merge_index([str(out / split / f"c{c:06d}" / "index.json") for c in chunk_ids], str(out / split))
    finally:
        root.setLevel(level)


def prepare_shards(inputs: list[str | Path], out: str | Path, opts: PrepSection, seq_len: int,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Run the whole prep; returns the manifest (also written to ``out/manifest.json``). ``overwrite``
    replaces a previous prep's files in ``out``; ``out`` is otherwise left as it was when the prep fails."""
    out = Path(out).resolve()  # the temporary sibling then shares out's filesystem, so moving is renaming
    files = list_inputs(inputs)
    _check_sources_outside(out, files, opts.tokenizer)
    previous = _previous_files(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # hidden, so a killed prep's leftovers are skipped when out's parent is itself given as an input
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        manifest = _write_shards(files, tmp, opts, seq_len, progress)
        _swap_in(tmp, out, previous)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_shards(files: list[Path], out: Path, opts: PrepSection, seq_len: int, progress: bool) -> dict:
    """Tokenise, pack and write ``files`` into the empty directory ``out``; returns the manifest."""
    from tqdm import tqdm

    kind = "sft" if opts.format == "sft" else "pretrain"
    if opts.tokenizer:
        tok = load_tokenizer(opts.tokenizer)
    else:
        tok = train_bpe(_texts(read_records(files, opts, ReadStats())), opts.vocab_size)
    special = ensure_special_tokens(tok, opts.eos_token)
    (out / "tokenizer").mkdir()
    tok.save(str(out / "tokenizer" / TOKENIZER_FILE))
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)

    settings = dict(out=str(out), kind=kind, seq_len=seq_len, eos=special.eos, pad=special.pad, dtype=dtype,
                    val_fraction=opts.val_fraction, compression=opts.compression,
                    shard_size_limit=opts.shard_size_limit, columns=mds_columns(kind, seq_len, dtype))
    stats = ReadStats()
    totals = {s: dict.fromkeys(COUNTS, 0) | {"shards": 0} for s in SPLITS}
    chunks_with = {s: [] for s in SPLITS}
    too_long = 0
    import streaming  # noqa: F401  imported (with torch) once here; the forked workers inherit it

    pool = ProcessPoolExecutor(opts.workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_init_worker, initargs=(tok.to_str(), opts, settings))
    bar = tqdm(unit="tok", unit_scale=True, desc="prep", disable=not progress, mininterval=0.5)
    pending: deque[tuple[int, Future]] = deque()

    def collect_one() -> None:
        nonlocal too_long
        chunk_id, future = pending.popleft()
        result = future.result()
        too_long += result["too_long"]
        documents, empty, bad, replaced = result["read"]
        stats.documents += documents
        stats.empty += empty
        stats.bad += bad
        stats.utf8_replaced += replaced
        for split in SPLITS:
            for key, value in result[split].items():
                totals[split][key] += value
            if result[split]["shards"]:
                chunks_with[split].append(chunk_id)
        bar.update(result["train"]["tokens"] + result["val"]["tokens"])

    try:
        for chunk_id, units in enumerate(chunk_units(read_units(files, opts, stats), opts.chunk_bytes)):
            pending.append((chunk_id, pool.submit(_process_chunk, chunk_id, units)))
            while len(pending) > 2 * opts.workers:  # bounded read-ahead keeps memory flat
                collect_one()
        while pending:
            collect_one()
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()

    splits = {}
    for split in SPLITS:
        if chunks_with[split]:
            _merge_split(out, split, chunks_with[split])
            splits[split] = totals[split]
    if "train" not in splits:
        raise PrepError(f"no training blocks were written from {len(files)} input file(s): "
                        f"{stats.documents} documents read, {stats.empty} empty, {stats.bad} bad")
    manifest = {
        "format": FORMAT, "version": VERSION, "kind": kind, "seq_len": seq_len, "token_dtype": dtype,
        "tokenizer": {"file": f"tokenizer/{TOKENIZER_FILE}", "sha256": tokenizer_sha256(tok),
                      "vocab_size": vocab_size, "eos_id": special.eos, "pad_id": special.pad,
                      "mask_id": special.mask},
        "splits": splits,
        "skipped": {"empty": stats.empty, "bad": stats.bad, "utf8_replaced": stats.utf8_replaced,
                    "too_long": too_long},
        "sources": stats.sources,
        "prep": opts.model_dump(mode="json"),
        "mlfm_scale_version": __version__,
        "files": sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()),
    }
    write_manifest(out, manifest)
    return manifest
