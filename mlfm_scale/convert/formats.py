"""The checkpoint formats we convert: name → ``plan(cfg, source)``, and how each opens its SRC (safetensors unless
``SOURCES`` says otherwise)."""
from __future__ import annotations

from pathlib import Path

from mlfm_scale.config import ModelSection
from mlfm_scale.convert import llada, reference, smdm
from mlfm_scale.convert.plan import ConversionPlan
from mlfm_scale.convert.source import SafetensorsSource
from mlfm_scale.errors import UserError

FORMATS = {"smdm": smdm.plan, "llada": llada.plan, "mlfm-reference": reference.plan}
SOURCES = {"mlfm-reference": reference.ReferenceSource}  # the reference's .pt (with its SMDM base beside it)


def plan_for(fmt: str, cfg: ModelSection, path: str | Path) -> ConversionPlan:
    """The conversion of the checkpoint at ``path`` (a safetensors file or directory; mlfm-reference: a .pt, or a
    directory holding one) written in format ``fmt``."""
    if fmt not in FORMATS:
        raise UserError(f"unknown checkpoint format {fmt!r}: one of {', '.join(FORMATS)}")
    return FORMATS[fmt](cfg, SOURCES.get(fmt, SafetensorsSource)(path))
