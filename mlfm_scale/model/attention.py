"""Bidirectional core attention for megatron-core's ModuleSpec: flash-attn varlen on GPU, torch SDPA elsewhere.

Megatron's own ``DotProductAttention`` hard-codes CUDA, so the layer spec swaps this module in. Attention may
be restricted to segments (packed documents, and the padded tail of a block): the model describes them once
per forward as an :class:`AttentionSegments` and passes it through ``TransformerBlock``: the dense boolean
mask as ``attention_mask`` (SDPA) and ``cu_seqlens`` as ``packed_seq_params`` (flash varlen).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from mlfm_scale.errors import UserError
from mlfm_scale.model.common import segment_starts_and_positions

try:  # optional: the `gpu` extra
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` → flash on CUDA in bf16/fp16 when flash-attn imports, else sdpa; ``flash`` without those is an
    error."""
    flash_ok = flash_attn_varlen_func is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    if requested == "flash" and not flash_ok:
        raise UserError("model.attention=flash needs a CUDA device, bf16 (train.dtype=bf16) and the flash-attn "
                        "package (pip install 'mlfm-scale[gpu]'); use model.attention=sdpa or auto")
    return "flash" if requested == "flash" or (requested == "auto" and flash_ok) else "sdpa"


@dataclass
class AttentionSegments:
    """Who attends to whom, from segment ids [b, s] (equal id ⇔ same segment).

    mask: [b, 1, s, s] bool, True = blocked (megatron's convention), or None when every row is one segment.
    packed: cu_seqlens over the flattened b·s tokens for flash varlen (None for SDPA).
    positions: [b, s] int64 RoPE positions, restarting at 0 at each segment start.
    """

    mask: torch.Tensor | None
    packed: PackedSeqParams | None
    positions: torch.Tensor

    @classmethod
    def from_segment_ids(cls, segment_ids: torch.Tensor, backend: str) -> AttentionSegments:
        b, s = segment_ids.shape
        new, positions = segment_starts_and_positions(segment_ids)
        single = not bool(new[:, 1:].any())
        if backend == "flash":
            flat_new = new.reshape(-1).clone()
            flat_new[::s] = True  # every row starts a sequence
            starts = torch.nonzero(flat_new).flatten().to(torch.int32)
            cu = torch.cat([starts, torch.tensor([b * s], dtype=torch.int32, device=starts.device)])
            longest = int((cu[1:] - cu[:-1]).max())
            packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     max_seqlen_q=longest, max_seqlen_kv=longest)
            return cls(None, packed, positions)
        mask = None if single else (segment_ids[:, None, :, None] != segment_ids[:, None, None, :])
        return cls(mask, None, positions)


class CoreAttention(MegatronModule):
    """Megatron's core-attention contract: q, k, v [s, b, heads_per_rank, head_dim] → [s, b, heads·head_dim]."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, backend: str = "sdpa"):
        super().__init__(config=config)
        self.backend = backend
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        s, b, heads, dim = query.shape
        dropout = self.dropout_p if self.training else 0.0
        if self.backend == "flash":
            flat = [t.transpose(0, 1).reshape(b * s, t.size(2), dim) for t in (query, key, value)]
            p = packed_seq_params
            out = flash_attn_varlen_func(*flat, p.cu_seqlens_q, p.cu_seqlens_kv, p.max_seqlen_q, p.max_seqlen_kv,
                                         dropout_p=dropout, softmax_scale=self.softmax_scale, causal=False)
            return out.reshape(b, s, heads * dim).transpose(0, 1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        allowed = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=self.softmax_scale,
                                             enable_gqa=k.size(1) != q.size(1))
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * dim)
