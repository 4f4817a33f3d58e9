"""AdaLN time conditioning (MLFM.md, Model): a megatron ``TransformerLayer`` subclass (the γ embedding it
consumes is ``model.common.GammaEmbedding``).

Per layer a zero-initialised Linear (after a SiLU, as in DiT) maps the conditioning c [b, hidden_c] (with
``model.time_mlp=per_layer``: the layer's own time MLP of the sinusoidal γ features) to
(shift1, scale1, gate1, shift2, scale2, gate2), each [b, d]:
    h   = x + (1 + gate1) · Attn(norm1(x) · (1 + scale1) + shift1)
    out = h + (1 + gate2) · MLP(norm2(h) · (1 + scale2) + shift2)
so at initialisation the layer is exactly a pre-norm transformer layer (a converted MDM starts as the MDM).
The conditioning travels through ``TransformerBlock(context=c)``; each layer returns it unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlfm_scale.config import ModelSection
from mlfm_scale.model import lora
from mlfm_scale.model.common import time_mlp
from mlfm_scale.model.init import seeded


class AdaLNTransformerLayer(TransformerLayer):
    """A megatron layer (RMSNorm, TP attention and SwiGLU MLP from the spec) with AdaLN modulation from
    ``context``; its weights come from (``init_seed``, layer number); ``recompute`` wraps the layer in
    ``torch.utils.checkpoint`` (megatron's recompute needs CUDA). ``model`` adds the per-layer time MLP and the
    LoRA adapters it asks for."""

    def __init__(self, config, submodules, layer_number=1, model: ModelSection | None = None,
                 init_seed: int = 0, **kw):
        model = model or ModelSection()
        with seeded(init_seed, f"layer{layer_number}"):  # the same weights whichever stage builds layer n
            super().__init__(config, submodules, layer_number=layer_number, **kw)
            self.modulation = nn.Linear(model.time_hidden_size, 6 * config.hidden_size, dtype=config.params_dtype)
            if model.time_mlp == "per_layer":
                self.time_mlp = time_mlp(model.time_embed_dim, model.time_hidden_size, config.params_dtype)
        self.recompute = model.recompute
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        if model.lora.rank:
            lora.attach_to_layer(self, model, init_seed)

    def forward(self, hidden_states, attention_mask=None, context=None, rotary_pos_emb=None,
                packed_seq_params=None, **_):
        args = (hidden_states, context, attention_mask, rotary_pos_emb, packed_seq_params)
        if self.recompute and self.training and torch.is_grad_enabled():
            out = checkpoint(self._modulated, *args, use_reentrant=False)
        else:
            out = self._modulated(*args)
        return make_viewless_tensor(out, requires_grad=True, keep_graph=True), context

    def _modulated(self, x, cond, attention_mask, rotary_pos_emb, packed_seq_params):
        """x [s, b, d], cond [b, time_hidden] (per_layer: [b, time_embed_dim] features) → [s, b, d]."""
        if hasattr(self, "time_mlp"):
            cond = self.time_mlp(cond)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond)).unsqueeze(0).chunk(6, dim=-1)
        h = self.input_layernorm(x) * (1 + scale1) + shift1
        attn, bias = self.self_attention(h, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                                         packed_seq_params=packed_seq_params)
        x = x + (1 + gate1) * (attn if bias is None else attn + bias)
        h = self.pre_mlp_layernorm(x) * (1 + scale2) + shift2
        mlp, bias = self.mlp(h)
        return x + (1 + gate2) * (mlp if bias is None else mlp + bias)
