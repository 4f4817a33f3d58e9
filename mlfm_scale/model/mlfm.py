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
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import LayerNormImpl, TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mlfm_scale.config import ModelSection
from mlfm_scale.errors import UserError
from mlfm_scale.model import lora
from mlfm_scale.model.adaln import AdaLNTransformerLayer
from mlfm_scale.model.attention import AttentionSegments, CoreAttention
from mlfm_scale.model.common import (
    GammaEmbedding,
    GammaFeatures,
    TargetGammaEmbedding,
    conditioning_width,
    rope_frequencies,
)
from mlfm_scale.model.init import seeded
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
    if cfg.num_heads % tp or cfg.query_groups % tp:
        raise UserError(f"model.num_heads={cfg.num_heads} and its {cfg.query_groups} query groups must both be "
                        f"divisible by parallel.tp={tp}")
    if cfg.ffn_hidden_size % tp:
        raise UserError(f"model.ffn_hidden_size={cfg.ffn_hidden_size} is not divisible by parallel.tp={tp}")
    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.query_groups, ffn_hidden_size=cfg.ffn_hidden_size, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        sequence_parallel=False)


def layer_spec(cfg: ModelSection, backend: str, seed: int = 0) -> ModuleSpec:
    """Megatron's local layer spec made bidirectional, with our core attention and the AdaLN layer (whose
    weights come from (seed, layer number))."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    attn = spec.submodules.self_attention
    attn.params = dict(attn.params, attn_mask_type=AttnMaskType.no_mask)
    attn.submodules.core_attention = ModuleSpec(module=CoreAttention, params={"backend": backend})
    spec.module = AdaLNTransformerLayer
    spec.params = {"model": cfg, "init_seed": seed}
    return spec


def layer_inputs(segment_ids: torch.Tensor, cfg: ModelSection, backend: str) -> tuple[AttentionSegments, torch.Tensor]:
    """segment ids [b, s] → (attention segments, RoPE frequencies [s, b, 1, head_dim]) for every layer."""
    segments = AttentionSegments.from_segment_ids(segment_ids, backend)
    return segments, rope_frequencies(segments.positions, cfg.hidden_size // cfg.num_heads, cfg.rope_base)


def mask_padded_logits(logits: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """Pin this rank's logits [..., V_pad/tp] beyond the real vocabulary to the dtype's lowest value."""
    real = vocab_size - vocab_start
    if real >= logits.size(-1):
        return logits
    keep = torch.arange(logits.size(-1), device=logits.device) < real
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)


# ------------------------------------------------------------------------------ the model's pieces
# Each piece is built from its own seed (model/init.py); the one-stage model and the pipeline stages
# (parallel/pipeline.py) are made of these same pieces.
def build_embedding(cfg: ModelSection, config: TransformerConfig, padded_vocab: int, seed: int
                    ) -> tensor_parallel.VocabParallelEmbedding:
    """E [V_pad/tp, d] on this rank, N(0, s²) with s = ``model.initial_embedding_std`` (the table's scale sets
    what γ means: σ is absolute), frozen unless ``model.freeze_embeddings`` is false."""
    std = cfg.initial_embedding_std
    with seeded(seed, "embedding"):
        embedding = tensor_parallel.VocabParallelEmbedding(
            padded_vocab, cfg.hidden_size, init_method=lambda w: torch.nn.init.normal_(w, std=std), config=config)
    embedding.weight.requires_grad_(not cfg.freeze_embeddings)
    return embedding


def build_gamma_embedding(cfg: ModelSection, dtype: torch.dtype, seed: int) -> GammaEmbedding | GammaFeatures:
    """γ [b] → the layers' conditioning: the shared γ MLP's output, or (``time_mlp=per_layer``) the sinusoidal
    features each layer's own MLP reads."""
    if cfg.time_mlp == "per_layer":
        return GammaFeatures(cfg.time_embed_dim, dtype)
    with seeded(seed, "gamma_embedding"):
        return GammaEmbedding(cfg.time_embed_dim, cfg.time_hidden_size, dtype)


def build_target_gamma_embedding(cfg: ModelSection, dtype: torch.dtype, seed: int) -> TargetGammaEmbedding | None:
    """A flow-map student's target-time embedding (``model.flow_map``), None otherwise."""
    if not cfg.flow_map:
        return None
    with seeded(seed, "target_gamma_embedding"):
        return TargetGammaEmbedding(cfg.time_embed_dim, cfg.time_hidden_size, conditioning_width(cfg), dtype)


def build_final_norm(config: TransformerConfig) -> torch.nn.Module:
    """The RMSNorm after the last layer (megatron's block norm implementation)."""
    return build_module(LayerNormImpl, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)


def build_output_layer(cfg: ModelSection, config: TransformerConfig, padded_vocab: int, seed: int
                       ) -> tensor_parallel.ColumnParallelLinear:
    """The vocab-parallel output projection d → V_pad/tp (no gather), with its LoRA delta when asked for."""
    with seeded(seed, "output_layer"):
        layer = tensor_parallel.ColumnParallelLinear(cfg.hidden_size, padded_vocab, config=config,
                                                     init_method=config.init_method, bias=False, gather_output=False)
    if cfg.lora.output_rank:
        lora.attach_to_output(layer, cfg.lora, cfg.hidden_size, padded_vocab, seed)
    return layer


def embedding_square_sums(module: torch.nn.Module, vocab_size: int) -> torch.Tensor:
    """Float64[2]: (Σ E², element count) over the real-vocabulary rows of the input table slices held in
    ``module`` (none on later pipeline stages). Summed over every rank, the ratio is the table's mean square:
    each data-parallel replica adds the same share."""
    sums = torch.zeros(2, dtype=torch.float64)
    for m in module.modules():
        if isinstance(m, tensor_parallel.VocabParallelEmbedding):
            rows = m.weight[: max(0, min(m.weight.size(0), vocab_size - m.vocab_start_index))].detach()
            sums += torch.tensor([float(rows.double().square().sum()), rows.numel()], dtype=torch.float64)
    return sums


class EmbeddingLookup:
    """Lookups in ``self.embedding`` (this rank's vocab-parallel rows of E), for the model and for a
    pipeline's first stage."""

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


class MLFMModel(EmbeddingLookup, MegatronModule):
    """z [b, s, d], γ [b], optional segment ids [b, s] → this rank's logits [b, s, V_pad/tp]. A flow-map student
    (``model.flow_map``) also takes the jump's target γ_t [b] (default γ: the jump of length 0, the posterior)."""

    def __init__(self, cfg: ModelSection, vocab_size: int, tp: int = 1, dtype: torch.dtype = torch.float32,
                 backend: str = "sdpa", seed: int = 0):
        config = transformer_config(cfg, tp, dtype)
        super().__init__(config=config)
        self.cfg, self.vocab_size, self.backend = cfg, vocab_size, backend
        self.padded_vocab = padded_vocab_size(vocab_size, tp)
        self.embedding = build_embedding(cfg, config, self.padded_vocab, seed)
        self.gamma_embedding = build_gamma_embedding(cfg, dtype, seed)
        self.target_gamma_embedding = build_target_gamma_embedding(cfg, dtype, seed)
        self.decoder = TransformerBlock(config, layer_spec(cfg, backend, seed), post_layer_norm=True)
        self.output_layer = build_output_layer(cfg, config, self.padded_vocab, seed)

    # -------------------------------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor, gamma: torch.Tensor, segment_ids: torch.Tensor | None = None,
                gamma_target: torch.Tensor | None = None) -> torch.Tensor:
        """z [b, s, d] (the forward process makes it float32; cast to the compute dtype here), γ [b]; a flow-map
        student's jump target γ_t [b]."""
        b, s, _ = z.shape
        z = z.to(self.config.params_dtype)
        if segment_ids is None:
            segment_ids = torch.zeros(b, s, dtype=torch.long, device=z.device)
        segments, rope = layer_inputs(segment_ids, self.cfg, self.backend)
        cond = self.gamma_embedding(gamma)
        if self.target_gamma_embedding is not None:
            cond = cond + self.target_gamma_embedding(gamma if gamma_target is None else gamma_target)
        elif gamma_target is not None:
            raise UserError("this model has no target-time embedding: only a flow-map student (model.flow_map, "
                            "`mlfm distill`) takes a jump target")
        hidden = self.decoder(hidden_states=z.transpose(0, 1).contiguous(), attention_mask=segments.mask,
                              context=cond, rotary_pos_emb=rope, packed_seq_params=segments.packed)
        logits, _ = self.output_layer(hidden)
        return mask_padded_logits(logits.transpose(0, 1), self.vocab_size, self.vocab_start)

    def vocab_outputs(self, logits: torch.Tensor, targets: torch.Tensor, posterior_mean: bool = True) -> VocabOutputs:
        """CE, diagnostics and (when ``posterior_mean``) x̂0 for this rank's logits, reduced over the TP group."""
        table = self.embedding_table() if posterior_mean else None
        return vocab_parallel_outputs(logits, targets, self.vocab_start, table)


