"""The batch a sampler works on: prompts of different lengths, each followed by the positions to fill.

Row b holds ``prompt_b`` then ``length`` (or up to ``seq_len``) positions set to ``mask_id``, then ``pad_id``
up to the longest row. Padding is its own attention segment (segment id 1), so real positions never see it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mlfm_scale.errors import UserError


@dataclass
class Canvas:
    """ids Long[b, s] (prompt, mask_id to fill, pad_id after the row), prompt / fill Bool[b, s], segment_ids
    Long[b, s] (1 on padding) or None when no row is padded."""

    ids: Tensor
    prompt: Tensor
    fill: Tensor
    segment_ids: Tensor | None

    def rows(self, index: Tensor) -> Canvas:
        """The sub-canvas of rows ``index`` (Long[a])."""
        seg = None if self.segment_ids is None else self.segment_ids[index]
        return Canvas(self.ids[index], self.prompt[index], self.fill[index], seg)


def build_canvas(prompts: list[list[int]], length: int | None, seq_len: int, mask_id: int, pad_id: int,
                 device: torch.device | str = "cpu") -> Canvas:
    """Lay out ``prompts`` (token ids; empty for unconditional samples) with ``length`` positions to fill each
    (None: up to ``seq_len``). Raises UserError for an empty batch, a prompt holding the mask id, or a row longer
    than ``seq_len``."""
    if not prompts:
        raise UserError("no prompts to sample from: give at least one (an empty prompt samples unconditionally)")
    rows = []
    for i, prompt in enumerate(prompts):
        if mask_id in prompt:
            raise UserError(f"prompt {i} contains the mask token (id {mask_id}); remove it from the prompt text")
        fill = length if length is not None else seq_len - len(prompt)
        if fill < 1 or len(prompt) + fill > seq_len:
            raise UserError(f"prompt {i} has {len(prompt)} tokens; with {fill} to generate it exceeds the model's "
                            f"seq_len {seq_len}: shorten the prompt or lower the generation length")
        rows.append(list(prompt) + [mask_id] * fill)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    prompt = torch.zeros(len(rows), width, dtype=torch.bool)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (row, p) in enumerate(zip(rows, prompts)):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        prompt[b, : len(p)] = True
        real[b, : len(row)] = True
    segment_ids = None if bool(real.all()) else (~real).long().to(device)
    return Canvas(ids.to(device), prompt.to(device), (real & ~prompt).to(device), segment_ids)
