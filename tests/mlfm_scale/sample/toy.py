"""Small in-test denoisers with the inference model's interface (mlfm_scale.inference.MLFMForInference)."""
from __future__ import annotations

import torch
from torch import nn

from mlfm_scale.flow.schedules import UniformGamma

V, D, SEQ = 40, 8, 32
MASK, EOS, PAD = V - 1, V - 3, V - 2


class ToyDenoiser(nn.Module):
    """A tiny random network over z (mixes positions through their mean, so the prompt matters) that counts its
    evaluations per row; ``fixed`` [SEQ] makes the logits one-hot on those tokens whatever the input."""

    def __init__(self, seed: int = 0, fixed: torch.Tensor | None = None, sharp: float = 50.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(V, D, generator=g), requires_grad=False)
        self.mix = nn.Parameter(torch.randn(2 * D + 1, V, generator=g), requires_grad=False)
        self.fixed, self.sharp = fixed, sharp
        self.mask_id, self.eos_id, self.pad_id, self.sigma, self.vocab_size, self.seq_len = MASK, EOS, PAD, 0.2, V, SEQ
        self.row_evaluations = 0
        self.inputs: list[torch.Tensor] = []

    def forward(self, z, gamma, segment_ids=None):
        self.row_evaluations += z.size(0)
        self.inputs.append(z.clone())
        if self.fixed is not None:
            return self.sharp * nn.functional.one_hot(self.fixed[: z.size(1)], V).float().expand(z.size(0), -1, -1)
        context = z.mean(dim=1, keepdim=True).expand_as(z)
        features = torch.cat([z, context, gamma[:, None, None].expand(-1, z.size(1), 1) / 10], dim=-1)
        return 3.0 * torch.tanh(features @ self.mix)

    def embed(self, ids):
        return self.table[ids]

    def mask_embedding(self):
        return self.table[MASK]

    def embedding_table(self):
        return self.table

    def gamma_schedule(self):
        return UniformGamma(-10.0, 6.0)
