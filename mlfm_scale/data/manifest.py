"""The manifest written beside prepared shards, and the compatibility check training runs against it.

``manifest.json`` records the tokenizer (file, sha256, vocabulary size, special ids), ``seq_len``, the token
dtype, counts per split (documents, tokens, blocks, padding, shards), skipped-record counts, the source
files and the prep options. Training refuses shards whose manifest does not fit the model.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mlfm_scale.errors import UserError

MANIFEST_FILE = "manifest.json"
FORMAT = "mlfm-shards"
VERSION = 1


class ManifestError(UserError):
    """Missing, malformed or incompatible shards; the message says which and what to do."""


def write_manifest(directory: str | Path, manifest: dict) -> Path:
    """Write ``manifest`` atomically (temp file + rename), so a reader never sees half of it."""
    path = Path(directory) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_FILE} in {directory}: prepare shards with `mlfm prep corpus` "
                            "(an interrupted prep writes none)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ManifestError(f"{path} is not an {FORMAT} v{VERSION} manifest "
                            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})")
    return manifest


def manifest_sha256(directory: str | Path) -> str:
    """Hash of the manifest file; checkpoints record it to tie a run to its data."""
    return hashlib.sha256((Path(directory) / MANIFEST_FILE).read_bytes()).hexdigest()


def check_compatible(manifest: dict, *, seq_len: int, vocab_size: int | None, kind: str = "pretrain") -> None:
    """Raise ManifestError listing every mismatch between the shards and a model/data config."""
    problems = []
    if manifest["seq_len"] != seq_len:
        problems.append(f"shards have seq_len {manifest['seq_len']}, config data.seq_len is {seq_len}")
    vocab = manifest["tokenizer"]["vocab_size"]
    if vocab_size is not None and vocab_size < vocab:
        problems.append(f"tokenizer has {vocab} ids (mask id {manifest['tokenizer']['mask_id']}), "
                        f"config model.vocab_size is {vocab_size}")
    if manifest["kind"] != kind:
        problems.append(f"shards are {manifest['kind']!r}, this job needs {kind!r}")
    if problems:
        raise ManifestError("shards do not fit the config:\n  " + "\n  ".join(problems)
                            + "\nre-run `mlfm prep corpus` with matching options or fix the config")
