"""Small in-test denoisers with the inference model's interface (mlfm_scale.inference.MLFMForInference)."""
from __future__ import annotations

import torch
from torch import nn

from mlfm_scale.flow.schedules import UniformGamma
from mlfm_scale.model.common import segment_starts_and_positions

V, D, SEQ = 40, 8, 32
MASK, EOS, PAD = V - 1, V - 3, V - 2


class ToyDenoiser(nn.Module):
    """A tiny random network over z that, like the real one, sees only its own segment (it mixes the positions of
    a segment through their mean, so the prompt matters) and each position's place in it (as RoPE does); it counts
    its evaluations per row and records its inputs (z, γ, segment ids); ``fixed`` [SEQ] makes the logits one-hot
    on those tokens whatever the input."""

    def __init__(self, seed: int = 0, fixed: torch.Tensor | None = None, sharp: float = 50.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(V, D, generator=g), requires_grad=False)
        self.mix = nn.Parameter(torch.randn(2 * D + 2, V, generator=g), requires_grad=False)
        self.fixed, self.sharp = fixed, sharp
        self.mask_id, self.eos_id, self.pad_id, self.sigma, self.vocab_size, self.seq_len = MASK, EOS, PAD, 0.2, V, SEQ
        self.row_evaluations = 0
        self.inputs: list[torch.Tensor] = []
        self.gammas: list[torch.Tensor] = []
        self.segments: list[torch.Tensor | None] = []

    def forward(self, z, gamma, segment_ids=None):
        self.row_evaluations += z.size(0)
        self.inputs.append(z.clone())
        self.gammas.append(gamma.clone())
        self.segments.append(None if segment_ids is None else segment_ids.clone())
        if self.fixed is not None:
            return self.sharp * nn.functional.one_hot(self.fixed[: z.size(1)], V).float().expand(z.size(0), -1, -1)
        if segment_ids is None:
            segment_ids = torch.zeros(z.shape[:2], dtype=torch.long)
        same = (segment_ids[:, :, None] == segment_ids[:, None, :]).float()
        context = same @ z / same.sum(dim=-1, keepdim=True)
        _, positions = segment_starts_and_positions(segment_ids)
        features = torch.cat([z, context, gamma[:, None, None].expand(-1, z.size(1), 1) / 10,
                              positions.unsqueeze(-1) / SEQ], dim=-1)
        return 3.0 * torch.tanh(features @ self.mix)

    def embed(self, ids):
        return self.table[ids]

    def mask_embedding(self):
        return self.table[MASK]

    def embedding_table(self):
        return self.table

    def gamma_schedule(self):
        return UniformGamma(-10.0, 6.0)

    def decision_window(self):
        return None  # gamma_min=auto ends at the law's median, γ = −2


class ToyFlowMap(ToyDenoiser):
    """A :class:`ToyDenoiser` posing as a flow-map student: it also takes the jump's target γ_t and records it
    (``targets``); the logits do not depend on it."""

    flow_map = True

    def __init__(self, seed: int = 0, fixed: torch.Tensor | None = None, sharp: float = 50.0):
        super().__init__(seed, fixed, sharp)
        self.targets: list[torch.Tensor | None] = []

    def forward(self, z, gamma, segment_ids=None, gamma_target=None):
        self.targets.append(None if gamma_target is None else gamma_target.clone())
        return super().forward(z, gamma, segment_ids)
