"""The MLFM network on megatron-core (MLFM.md, Model).

    ids ──embed──▶ e ──(forward process, outside the model)──▶ z [b, s, d]
    γ [b] ──GammaEmbedding──▶ c [b, 512]
    z, c ──TransformerBlock(AdaLN layers, RMSNorm, SwiGLU, RoPE, bidirectional)──▶ final RMSNorm
         ──ColumnParallelLinear (vocab-parallel, no gather)──▶ logits [b, s, V_pad/tp]

The model consumes embeddings, so corruption happens between ``embed`` and ``forward``. The vocabulary is
padded to a multiple of 128; padded logits are pinned to the dtype's lowest value so they carry no mass.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mlfm_scale.config import ModelSection
from mlfm_scale.errors import UserError
from mlfm_scale.model.adaln import AdaLNTransformerLayer
from mlfm_scale.model.attention import AttentionSegments, CoreAttention
from mlfm_scale.model.common import GammaEmbedding, rope_frequencies
from mlfm_scale.model.vocab_parallel import VocabOutputs, vocab_parallel_outputs

VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of 128, whatever the TP size (so the weights, and checkpoints,
    do not depend on the layout); TP must divide it."""
    padded = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if padded % tp:
        raise UserError(f"parallel.tp={tp} does not divide the padded vocabulary {padded}")
    return padded


def transformer_config(cfg: ModelSection, tp: int, dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """Megatron config for one pipeline stage: CPU initialisation (the full weight drawn from the torch RNG,
    then sliced, so every TP size starts from the same weights), fusions off, no sequence parallelism."""
    if cfg.num_heads % tp:
        raise UserError(f"model.num_heads={cfg.num_heads} is not divisible by parallel.tp={tp}")
    if cfg.ffn_hidden_size % tp:
        raise UserError(f"model.ffn_hidden_size={cfg.ffn_hidden_size} is not divisible by parallel.tp={tp}")
    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.ffn_hidden_size, tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        sequence_parallel=False)


def layer_spec(cfg: ModelSection, backend: str) -> ModuleSpec:
    """Megatron's local layer spec made bidirectional, with our core attention and the AdaLN layer."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    attn = spec.submodules.self_attention
    attn.params = dict(attn.params, attn_mask_type=AttnMaskType.no_mask)
    attn.submodules.core_attention = ModuleSpec(module=CoreAttention, params={"backend": backend})
    spec.module = AdaLNTransformerLayer
    spec.params = {"cond_size": cfg.time_hidden_size, "recompute": cfg.recompute}
    return spec


class MLFMModel(MegatronModule):
    """z [b, s, d], γ [b], optional segment ids [b, s] → this rank's logits [b, s, V_pad/tp]."""

    def __init__(self, cfg: ModelSection, vocab_size: int, tp: int = 1, dtype: torch.dtype = torch.float32,
                 backend: str = "sdpa"):
        config = transformer_config(cfg, tp, dtype)
        super().__init__(config=config)
        self.cfg, self.vocab_size, self.backend = cfg, vocab_size, backend
        self.padded_vocab = padded_vocab_size(vocab_size, tp)
        init = config.init_method
        std = cfg.embedding_std  # the table's scale sets what γ means (σ is absolute): unit scale by default
        self.embedding = tensor_parallel.VocabParallelEmbedding(
            self.padded_vocab, cfg.hidden_size, init_method=lambda w: torch.nn.init.normal_(w, std=std), config=config)
        self.embedding.weight.requires_grad_(not cfg.freeze_embeddings)
        self.gamma_embedding = GammaEmbedding(cfg.time_embed_dim, cfg.time_hidden_size, dtype)
        self.decoder = TransformerBlock(config, layer_spec(cfg, backend), post_layer_norm=True)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, self.padded_vocab, config=config, init_method=init, bias=False, gather_output=False)

    # ----------------------------------------------------------------------------------- embeddings
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [b, s] → e [b, s, d] (vocab-parallel lookup, reduced over TP)."""
        return self.embedding(ids)

    def mask_embedding(self, mask_id: int) -> torch.Tensor:
        """m = E[mask_id], [d]."""
        return self.embed(torch.tensor([[mask_id]], device=self.embedding.weight.device))[0, 0]

    @property
    def vocab_start(self) -> int:
        return self.embedding.vocab_start_index

    def embedding_table(self) -> torch.Tensor:
        """This rank's rows of E, [V_pad/tp, d], for x̂0 = softmax(logits)·E."""
        return self.embedding.weight

    # -------------------------------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor, gamma: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = z.shape
        if segment_ids is None:
            segment_ids = torch.zeros(b, s, dtype=torch.long, device=z.device)
        segments = AttentionSegments.from_segment_ids(segment_ids, self.backend)
        rope = rope_frequencies(segments.positions, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_base)
        cond = self.gamma_embedding(gamma)
        hidden = self.decoder(hidden_states=z.transpose(0, 1).contiguous(), attention_mask=segments.mask,
                              context=cond, rotary_pos_emb=rope, packed_seq_params=segments.packed)
        logits, _ = self.output_layer(hidden)
        return self._mask_padding(logits.transpose(0, 1))

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        real = self.vocab_size - self.vocab_start
        if real >= logits.size(-1):
            return logits
        keep = torch.arange(logits.size(-1), device=logits.device) < real
        return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)

    def vocab_outputs(self, logits: torch.Tensor, targets: torch.Tensor, posterior_mean: bool = True) -> VocabOutputs:
        """CE, diagnostics and (when ``posterior_mean``) x̂0 for this rank's logits, reduced over the TP group."""
        table = self.embedding_table() if posterior_mean else None
        return vocab_parallel_outputs(logits, targets, self.vocab_start, table)


