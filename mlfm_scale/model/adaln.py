"""AdaLN time conditioning (MLFM.md, Model): a megatron ``TransformerLayer`` subclass (the γ embedding it
consumes is ``model.common.GammaEmbedding``).

Per layer a zero-initialised Linear (after a SiLU, as in DiT) maps the conditioning c [b, hidden_c] to
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


class AdaLNTransformerLayer(TransformerLayer):
    """A megatron layer (RMSNorm, TP attention and SwiGLU MLP from the spec) with AdaLN modulation from
    ``context``; ``recompute`` wraps the layer in ``torch.utils.checkpoint`` (megatron's recompute needs CUDA)."""

    def __init__(self, config, submodules, layer_number=1, cond_size: int = 512, recompute: bool = False, **kw):
        super().__init__(config, submodules, layer_number=layer_number, **kw)
        self.recompute = recompute
        self.modulation = nn.Linear(cond_size, 6 * config.hidden_size, dtype=config.params_dtype)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, hidden_states, attention_mask=None, context=None, rotary_pos_emb=None,
                packed_seq_params=None, **_):
        args = (hidden_states, context, attention_mask, rotary_pos_emb, packed_seq_params)
        if self.recompute and self.training and torch.is_grad_enabled():
            out = checkpoint(self._modulated, *args, use_reentrant=False)
        else:
            out = self._modulated(*args)
        return make_viewless_tensor(out, requires_grad=True, keep_graph=True), context

    def _modulated(self, x, cond, attention_mask, rotary_pos_emb, packed_seq_params):
        """x [s, b, d], cond [b, cond_size] → [s, b, d]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond)).unsqueeze(0).chunk(6, dim=-1)
        h = self.input_layernorm(x) * (1 + scale1) + shift1
        attn, bias = self.self_attention(h, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                                         packed_seq_params=packed_seq_params)
        x = x + (1 + gate1) * (attn if bias is None else attn + bias)
        h = self.pre_mlp_layernorm(x) * (1 + scale2) + shift2
        mlp, bias = self.mlp(h)
        return x + (1 + gate2) * (mlp if bias is None else mlp + bias)
