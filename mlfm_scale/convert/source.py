"""A pretrained checkpoint in safetensors, read one tensor at a time.

A single ``.safetensors`` file, or a directory of shards: those named by ``model.safetensors.index.json`` when
the directory has one (so a consolidated copy lying beside the shards is not read twice), else every
``*.safetensors`` in it. Only the headers are read up front; each ``get`` reads that one tensor's bytes with
plain reads (no memory map, whose touched pages would count as a second copy) straight into the float32 result,
a 16 MiB block at a time for other dtypes, and keeps nothing: the peak is the float32 tensor and one block.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from mlfm_scale.errors import UserError

INDEX, CONFIG = "model.safetensors.index.json", "config.json"
BLOCK = 16 << 20  # bytes of a non-float32 tensor read and converted at a time
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_header(file: Path) -> tuple[dict, int]:
    """(a safetensors file's header, the offset of its data); raises UserError for a file that is not one."""
    try:
        with file.open("rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > 100 << 20:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{file} is not a readable safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsSource:
    """``keys()``, ``shape(key)``, ``get(key)`` (float32) and ``config()`` of a safetensors checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path} does not exist: give a .safetensors file or a directory of shards")
        files = self._files()
        self._file: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._bytes: dict[str, tuple[torch.dtype, int, int]] = {}  # dtype, first byte, end
        for file in files:
            header, start = read_header(file)
            for key, info in header.items():
                if key in self._file:
                    raise UserError(f"{key} is in both {self._file[key]} and {file}: remove the stray shard, or "
                                    "point at one of the files")
                if info.get("dtype") not in DTYPES:
                    raise UserError(f"{key} in {file} has dtype {info.get('dtype')}: only float tensors convert")
                self._file[key], self._shape[key] = file, tuple(info["shape"])
                begin, end = info["data_offsets"]
                self._bytes[key] = (DTYPES[info["dtype"]], start + begin, start + end)

    def _files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        index = self.path / INDEX
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise UserError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise UserError(f"{index} names shards that are missing: {', '.join(missing)}; download them")
            return [self.path / n for n in names]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.path} holds no *.safetensors files")
        return files

    def keys(self) -> list[str]:
        return list(self._file)

    def where(self, key: str) -> Path:
        """The file holding ``key``."""
        if key not in self._file:
            raise UserError(f"{key} is not in {self.path}: the checkpoint is incomplete or not of this format")
        return self._file[key]

    def shape(self, key: str) -> tuple[int, ...]:
        self.where(key)
        return self._shape[key]

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as float32, read from its file alone."""
        file = self.where(key)
        dtype, begin, end = self._bytes[key]
        out = torch.empty(self._shape[key], dtype=torch.float32)
        flat, width = out.view(-1), dtype.itemsize
        if flat.numel() * width != end - begin:
            raise UserError(f"{key} in {file}: its header gives {end - begin} bytes for shape {list(out.shape)}")
        got = 0
        with file.open("rb") as f:
            f.seek(begin)
            if dtype == torch.float32:
                got = f.readinto(memoryview(flat.view(torch.uint8).numpy()))
            else:
                block = torch.empty(min(BLOCK, end - begin), dtype=torch.uint8)
                while got < end - begin:
                    n = f.readinto(memoryview(block[: min(BLOCK, end - begin - got)].numpy()))
                    if not n:
                        break
                    flat[got // width:(got + n) // width].copy_(block[:n].view(dtype))
                    got += n
        if got != end - begin:
            raise UserError(f"{file} is truncated: {key} has {got} of its {end - begin} bytes; download it again")
        return out

    def config(self) -> dict | None:
        """The checkpoint directory's ``config.json`` (a file's: the one beside it), or None without one."""
        path = (self.path if self.path.is_dir() else self.path.parent) / CONFIG
        if not path.is_file():
            return None
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise UserError(f"{path} holds a {type(config).__name__}, not a JSON object")
        return config
