"""Plain-PyTorch pieces shared by the megatron-core model and the inference model (no megatron import here):
the γ embedding, RoPE frequencies and per-segment positions."""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(gamma: torch.Tensor, width: int, max_period: float = 10000.0) -> torch.Tensor:
    """[b] raw γ (log-NSR) → [b, width] (cos | sin) features, float32."""
    half = width // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=gamma.device) / half)
    angles = gamma.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class GammaEmbedding(nn.Module):
    """γ [b] → c [b, hidden]: sinusoidal(width) → Linear → SiLU → Linear. Replicated on every TP rank."""

    def __init__(self, width: int, hidden: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(width, hidden, dtype=dtype), nn.SiLU(),
                                 nn.Linear(hidden, hidden, dtype=dtype))

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(gamma, self.width).to(self.mlp[0].weight.dtype))


def rope_frequencies(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """positions [b, s] → megatron's rotary_pos_emb layout [s, b, 1, dim] (non-interleaved halves)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    freqs = positions.float()[..., None] * inv
    return torch.cat([freqs, freqs], dim=-1).transpose(0, 1).unsqueeze(2)


def segment_starts_and_positions(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segment ids [b, s] (equal id ⇔ same segment) → (Bool[b, s] True where a segment starts,
    int64 [b, s] RoPE positions restarting at 0 at each segment start)."""
    b, s = segment_ids.shape
    idx = torch.arange(s, device=segment_ids.device).expand(b, s)
    new = torch.ones_like(segment_ids, dtype=torch.bool)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.cummax(torch.where(new, idx, torch.zeros_like(idx)), dim=1).values
    return new, idx - start
