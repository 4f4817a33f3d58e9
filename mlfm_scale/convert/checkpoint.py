"""``mlfm convert``'s output: a step-0 checkpoint in the layout-free form, written one tensor at a time.

    OUT/latest                                      step00000000
    OUT/step00000000/checkpoint.json                {"step": 0, "layout": "layout-free", "converted": ..., files}
    OUT/step00000000/universal/param.safetensors    canonical name → full float32 tensor (train/universal.py)
    OUT/step00000000/universal/state.pt             client state: the config, the conversion record
    OUT/step00000000/universal/checkpoint.json      its files, and the hash of the tag's manifest

``mlfm train`` starts from it on any layout (``train.init_from=OUT``: each rank loads its shard), ``mlfm
export`` reads it as any checkpoint. The source's tensors are streamed into one safetensors file (header
first, from the shapes; then each tensor as it is read, the vocabulary padding as zero bytes), so the peak
memory is one converted tensor and its sources. What the source lacks (AdaLN and, when configured, LoRA) starts
as a new run's: zero modulation and LoRA B (so the converted model is the source model), A and the γ MLPs drawn
from their own seeds.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from mlfm_scale.config import Config
from mlfm_scale.convert.plan import ConversionPlan, Entry
from mlfm_scale.durable import publish_dir, staging
from mlfm_scale.model import lora
from mlfm_scale.model.common import time_mlp
from mlfm_scale.model.init import seeded
from mlfm_scale.model.mlfm import build_gamma_embedding
from mlfm_scale.redact import redact
from mlfm_scale.train.checkpoint import LATEST, UNIVERSAL, describe, manifest_sha256, tag_for, write_manifest

LAYOUT_FREE = "layout-free"  # the tag manifest's "layout": no engine files, only the universal form
ZERO_BLOCK = 1 << 24


def fresh_entries(cfg: Config, have: set[str]) -> list[Entry]:
    """The parameters a source lacks and the model has: per layer the zero-initialised modulation (and with
    ``time_mlp=per_layer`` its time MLP), the shared γ embedding, and the LoRA adapters the config asks for
    (A as the model draws it, B zero). Small tensors: each is made when read."""
    m, seed = cfg.model, cfg.seed
    d, hidden = m.hidden_size, m.time_hidden_size
    entries: list[Entry] = []

    def add(name: str, shape: tuple[int, ...], read) -> None:
        if name not in have:
            entries.append(Entry(name, shape, read))

    if m.time_mlp == "shared":
        gamma = {f"gamma_embedding.{n}": p.detach() for n, p in
                 build_gamma_embedding(m, torch.float32, seed).named_parameters()}
        for name, t in gamma.items():
            add(name, tuple(t.shape), lambda t=t: t)
    shapes = lora.target_shapes(m)
    for i in range(m.num_layers):
        add(f"layers.{i}.modulation.weight", (6 * d, hidden), lambda: torch.zeros(6 * d, hidden))
        add(f"layers.{i}.modulation.bias", (6 * d,), lambda: torch.zeros(6 * d))
        if m.time_mlp == "per_layer":
            with seeded(seed, f"layer{i + 1}.time_mlp"):
                mlp = {n: p.detach() for n, p in time_mlp(m.time_embed_dim, hidden).named_parameters()}
            for name, t in mlp.items():
                add(f"layers.{i}.time_mlp.{name}", tuple(t.shape), lambda t=t: t)
        for target in m.lora.targets if m.lora.rank else ():
            path, parts = lora.TARGETS[target]
            fan_in, out = shapes[target]
            lead = (parts,) if parts > 1 else ()
            add(f"layers.{i}.{path}.lora.a", (*lead, m.lora.rank, fan_in),
                lambda f=fan_in, t=target, i=i, p=parts: lora.initial_a(m.lora.rank, f, seed, f"layer{i + 1}.lora.{t}",
                                                                        p))
            b = (*lead, out // parts, m.lora.rank)
            add(f"layers.{i}.{path}.lora.b", b, lambda b=b: torch.zeros(b))
    return entries


def output_lora_entries(cfg: Config, padded_vocab: int, have: set[str]) -> list[Entry]:
    """The output head's LoRA delta when ``model.lora.output_rank`` asks for one."""
    m = cfg.model
    r = m.lora.output_rank
    if not r or "output_layer.lora.a" in have:
        return []
    return [Entry("output_layer.lora.a", (r, m.hidden_size),
                  lambda: lora.initial_a(r, m.hidden_size, cfg.seed, "output_layer.lora")),
            Entry("output_layer.lora.b", (padded_vocab, r), lambda: torch.zeros(padded_vocab, r))]


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def write_safetensors_streaming(path: Path, entries: list[Entry], metadata: dict[str, str],
                                dtype: torch.dtype = torch.float32) -> None:
    """One safetensors file of ``entries`` in order (stored in ``dtype``), each read and written in turn (rows
    it does not return are written as zeros)."""
    width = dtype.itemsize
    header, offset = {"__metadata__": metadata}, 0
    for e in entries:
        nbytes = width * int(np.prod(e.shape, dtype=np.int64))
        header[e.name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for e in entries:
            t = e.read()
            if t.dtype != torch.float32 or tuple(t.shape[1:]) != e.shape[1:] or t.size(0) > e.shape[0]:
                raise ValueError(f"{e.name}: read {tuple(t.shape)} {t.dtype}, declared {e.shape} float32")
            t = t.to(dtype).contiguous()
            f.write(memoryview((t.view(torch.int16) if dtype == torch.bfloat16 else t).numpy()).cast("B"))
            missing = width * (int(np.prod(e.shape, dtype=np.int64)) - t.numel())
            del t
            while missing > 0:
                f.write(bytes(min(missing, ZERO_BLOCK)))
                missing -= ZERO_BLOCK


def write_converted(cfg: Config, plan: ConversionPlan, out: Path, record: dict, data_hash: str | None) -> Path:
    """Write the converted checkpoint ``out`` (staged as ``OUT.tmp``, then renamed into place); returns its tag
    directory."""
    from mlfm_scale.model.mlfm import padded_vocab_size

    have = {e.name for e in plan.entries}
    entries = [*plan.entries, *fresh_entries(cfg, have),
               *output_lora_entries(cfg, padded_vocab_size(plan.vocab_size, 1), have)]
    staged = staging(out)
    tag_dir = staged / tag_for(0)
    universal = tag_dir / UNIVERSAL
    universal.mkdir(parents=True)
    write_safetensors_streaming(universal / "param.safetensors", entries, {"format": "pt"})
    conversion = {**record, "vocab_size": plan.vocab_size, "mask_id": plan.mask_id, "notes": plan.notes}
    client = {"components": {}, "manifest_sha256": data_hash, "config": redact(cfg.model_dump(mode="json")),
              "conversion": conversion}
    torch.save({"client": client, "optimizer_step": 0, "lr_scheduler": None, "engine": {}, "source": {}},
               universal / "state.pt")
    files = describe(universal, ["state.pt", "param.safetensors"])  # hashed once, listed in both manifests
    write_manifest(tag_dir, {"step": 0, "layout": LAYOUT_FREE, "converted": conversion, "good": True},
                   {f"{UNIVERSAL}/{name}": digest for name, digest in files.items()})
    write_manifest(universal, {"step": 0, "universal_of": str(out.absolute() / tag_for(0)), "source_manifest_sha256":
                               manifest_sha256(tag_dir)}, files)
    (staged / LATEST).write_text(tag_for(0))
    publish_dir(out)
    return out / tag_for(0)
