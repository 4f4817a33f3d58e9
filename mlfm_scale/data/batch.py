"""The unit of training input: one micro-batch of packed blocks on a device."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MicroBatch:
    """tokens Long[b, s]; lengths Long[b] real positions per row; segment_ids Long[b, s] (attention segments,
    None = whole block); response Bool[b, s] (SFT only)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    segment_ids: torch.Tensor | None = None
    response: torch.Tensor | None = None

    def prefix(self, length: int) -> MicroBatch:
        cut = lambda x: None if x is None else x[:, :length]
        return MicroBatch(self.tokens[:, :length], self.lengths.clamp(max=length), cut(self.segment_ids),
                          cut(self.response))
