"""Read documents from JSONL, plain text, Parquet, or prompt/response JSONL (SFT).

``read_records`` yields a ``str`` per pretraining document or a ``(prompt, response)`` pair per SFT
example, in a deterministic order (inputs as given, directories sorted). Problems raise
:class:`CorpusError` naming the file and line, unless ``skip_bad`` counts and skips them.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mlfm_scale.config import PrepSection
from mlfm_scale.errors import UserError

Record = str | tuple[str, str]


@dataclass(frozen=True)
class RawLines:
    """Consecutive whole JSONL lines of ``path``, not yet parsed, the first being line ``first_line``."""

    path: str
    first_line: int
    data: bytes
    sft: bool = False

    def __len__(self) -> int:
        return len(self.data)


Unit = Record | RawLines
_FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


class CorpusError(UserError):
    """Input the prep cannot use; the message names the file (and line) and what to do."""


@dataclass
class ReadStats:
    documents: int = 0  # records yielded
    empty: int = 0  # empty or whitespace-only documents, skipped
    bad: int = 0  # malformed records skipped under skip_bad
    utf8_replaced: int = 0  # records whose invalid UTF-8 was replaced under utf8_errors=replace
    sources: list[dict] = field(default_factory=list)  # {"path", "bytes", "format"} per input file


def list_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files named by ``inputs``; directories expand to their files, sorted, recursively (hidden skipped)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise CorpusError(f"input directory {p} holds no files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise CorpusError(f"input not found: {p}")
    return files


def input_format(path: Path, fmt: str) -> str:
    """``fmt`` unless it is ``auto``: then jsonl / parquet by suffix, text otherwise."""
    return _FORMAT_BY_SUFFIX.get(path.suffix.lower(), "text") if fmt == "auto" else fmt


class _Reader:
    def __init__(self, opts: PrepSection, stats: ReadStats):
        self.opts, self.stats = opts, stats

    def fail(self, where: str, problem: str, hint: str) -> None:
        """Raise, or count the record as bad when skip_bad is set (and return None: no record)."""
        if not self.opts.skip_bad:
            raise CorpusError(f"{where}: {problem}; {hint}")
        self.stats.bad += 1

    def decode(self, raw: bytes, where: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.opts.utf8_errors != "replace":
                raise CorpusError(f"{where}: invalid UTF-8 at byte {e.start}; fix the file or pass "
                                  "--utf8-errors replace to substitute U+FFFD (counted)") from None
            self.stats.utf8_replaced += 1
            return raw.decode("utf-8", errors="replace")

    def keep(self, text: str) -> bool:
        if text.strip():
            return True
        self.stats.empty += 1
        return False

    def field(self, obj: dict, name: str, where: str, flag: str) -> str | None:
        value = obj.get(name)
        if isinstance(value, str):
            return value
        if value is None and name not in obj:
            self.fail(where, f"no field {name!r} (fields: {sorted(obj)})", f"choose the field with {flag}")
        else:
            self.fail(where, f"field {name!r} is {type(value).__name__}, not a string", "fix the record")
        return None

    def lines(self, raw: RawLines) -> Iterator[Record]:
        """The records of a block of JSONL lines (blank lines, empty documents and, under skip_bad, bad lines
        are skipped)."""
        for lineno, data in enumerate(raw.data.split(b"\n"), raw.first_line):
            if data.strip() and (record := self.line(data, f"{raw.path}:{lineno}", raw.sft)) is not None:
                yield record

    def line(self, data: bytes, where: str, sft: bool) -> Record | None:
        try:
            obj = json.loads(self.decode(data, where))
        except json.JSONDecodeError as e:
            return self.fail(where, f"malformed JSON ({e.msg} at column {e.colno})",
                             "fix the line or pass --skip-bad to count and skip such lines")
        if not isinstance(obj, dict):
            return self.fail(where, f"expected a JSON object, got {type(obj).__name__}", "fix the line")
        if sft:
            prompt = self.field(obj, self.opts.prompt_field, where, "--prompt-field")
            response = self.field(obj, self.opts.response_field, where, "--response-field")
            if prompt is None or response is None or not self.keep(response):
                return None
            template = self.opts.chat_template
            return (prompt if template is None else template.replace("{prompt}", prompt)), response
        text = self.field(obj, self.opts.text_field, where, "--text-field")
        return text if text is not None and self.keep(text) else None

    def text(self, path: Path) -> Iterator[Record]:
        content = self.decode(path.read_bytes(), str(path))
        if self.opts.doc_per == "file":
            docs = [content]
        elif self.opts.doc_per == "line":
            docs = content.splitlines()
        else:
            docs = content.split("\n\n")
        yield from (d for d in docs if self.keep(d))

    def parquet(self, path: Path) -> Iterator[Record]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid and OSError variants
            raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
        name = self.opts.text_field
        if name not in pf.schema_arrow.names:
            raise CorpusError(f"{path}: no column {name!r} (columns: {pf.schema_arrow.names}); "
                              "choose it with --text-field")
        row = 0
        for batch in pf.iter_batches(columns=[name], batch_size=4096):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    self.stats.empty += 1
                elif not isinstance(value, str):
                    self.fail(f"{path}: row {row}", f"column {name!r} holds {type(value).__name__}",
                              "use a string column")
                elif self.keep(value):
                    yield value


def _jsonl_blocks(path: Path, sft: bool, block_bytes: int) -> Iterator[RawLines]:
    """``path`` in blocks of whole lines of about ``block_bytes`` each."""
    with path.open("rb") as f:
        first_line = 1
        while data := f.read(block_bytes):
            if not data.endswith(b"\n"):
                data += f.readline()
            yield RawLines(str(path), first_line, data, sft)
            first_line += data.count(b"\n")


def read_units(files: list[Path], opts: PrepSection, stats: ReadStats) -> Iterator[Unit]:
    """The inputs in order as units: JSONL as blocks of unparsed lines (:class:`RawLines`, of about
    ``opts.chunk_bytes``, parsed by whoever tokenises them), text and Parquet documents as records. Counts the
    sources, and the empty text/Parquet documents."""
    reader = _Reader(opts, stats)
    for path in files:
        fmt = input_format(path, opts.format)
        stats.sources.append({"path": str(path), "bytes": path.stat().st_size, "format": fmt})
        if fmt == "parquet":
            yield from reader.parquet(path)
        elif fmt == "text":
            yield from reader.text(path)
        else:
            yield from _jsonl_blocks(path, fmt == "sft", opts.chunk_bytes)


def parse_units(units: Iterable[Unit], opts: PrepSection, stats: ReadStats) -> Iterator[Record]:
    """Records from units (JSONL blocks parsed here); counts documents, and the empty and bad lines."""
    reader = _Reader(opts, stats)
    for unit in units:
        for record in reader.lines(unit) if isinstance(unit, RawLines) else (unit,):
            stats.documents += 1
            yield record


def read_records(files: list[Path], opts: PrepSection, stats: ReadStats) -> Iterator[Record]:
    """Every record of ``files`` in order; ``stats`` is updated as they are read."""
    return parse_units(read_units(files, opts, stats), opts, stats)
