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


def time_mlp(width: int, hidden: int, dtype: torch.dtype = torch.float32, out: int | None = None) -> nn.Sequential:
    """[b, width] sinusoidal features → [b, out or hidden]: Linear → SiLU → Linear."""
    return nn.Sequential(nn.Linear(width, hidden, dtype=dtype), nn.SiLU(),
                         nn.Linear(hidden, out or hidden, dtype=dtype))


class GammaEmbedding(nn.Module):
    """γ [b] → c [b, hidden]: sinusoidal(width) → ``time_mlp``. Replicated on every TP rank."""

    def __init__(self, width: int, hidden: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.width = width
        self.mlp = time_mlp(width, hidden, dtype)

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(gamma, self.width).to(self.mlp[0].weight.dtype))


class GammaFeatures(nn.Module):
    """γ [b] → sinusoidal(width) [b, width] in ``dtype``: the conditioning when each layer has its own time MLP
    (``model.time_mlp=per_layer``). No parameters."""

    def __init__(self, width: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.width, self.dtype = width, dtype

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(gamma, self.width).to(self.dtype)


class TargetGammaEmbedding(nn.Module):
    """A flow-map student's second time embedding (``model.flow_map``): the jump's target γ_t [b] →
    sinusoidal(width) → Linear → SiLU → Linear → [b, out], added to the conditioning of the start γ_s (``out`` its
    width). The last Linear starts at zero, so a new student is exactly its teacher. Replicated on every TP rank."""

    def __init__(self, width: int, hidden: int, out: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.width = width
        self.mlp = time_mlp(width, hidden, dtype, out)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(gamma, self.width).to(self.mlp[0].weight.dtype))


def conditioning_width(cfg) -> int:
    """Width of the conditioning the layers read (``cfg``: the model section): the shared γ MLP's output, or
    the sinusoidal features each layer's own MLP reads (``time_mlp=per_layer``)."""
    return cfg.time_embed_dim if cfg.time_mlp == "per_layer" else cfg.time_hidden_size


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


def merge_adapters(weights: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], lora) -> None:
    """Fold LoRA adapters (``X.lora.a`` [r, in], ``X.lora.b`` [out, r], popped from ``adapters``; fc1's side by
    side: [2, r, in] and [2, out/2, r]) into the full base weights ``X.weight`` [out, in] of ``weights``:
    W + (α/r)·B A in float32, stored in W's dtype. ``lora``: the ``model.lora`` settings (the output head has its
    own rank and α)."""
    for name in [n for n in adapters if n.endswith(".lora.a")]:
        base = name.removesuffix(".lora.a")
        rank, alpha = (lora.output_rank, lora.output_alpha) if base == "output_layer" else (lora.rank, lora.alpha)
        w, a, b = weights[f"{base}.weight"], adapters.pop(name), adapters.pop(f"{base}.lora.b")
        delta = (b.float() @ a.float()).flatten(0, -2)  # parts stacked along the rows
        weights[f"{base}.weight"] = (w.float() + (alpha / rank) * delta).to(w.dtype)
