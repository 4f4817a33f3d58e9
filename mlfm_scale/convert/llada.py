"""LLaDA (Hugging Face ``GSAI-ML/LLaDA-8B-*`` directories: ``config.json`` + safetensors shards) → our base weights.

LLaDA's ``LLaDALlamaBlock`` (``modeling_llada.py``) is a bidirectional pre-norm LLaMA: RMSNorm computed in
float32 (eps ``rms_norm_eps``), RoPE base ``rope_theta`` on the full head dimension (non-interleaved halves),
grouped-query attention (key/value head j serves query heads j·h/g … (j+1)·h/g − 1), no biases, an untied head:

    model.transformer.wte.weight                 [embedding_size, d]   (the mask token 126336 is one of its rows)
    model.transformer.blocks.{i}.attn_norm.weight  [d]
    model.transformer.blocks.{i}.{q,k,v}_proj.weight  [h·hd, d], [g·hd, d], [g·hd, d]
    model.transformer.blocks.{i}.attn_out.weight   [d, d]
    model.transformer.blocks.{i}.ff_norm.weight    [d]
    model.transformer.blocks.{i}.{ff_proj,up_proj}.weight  [f, d]   ff_out(silu(ff_proj·x) * up_proj·x)
    model.transformer.blocks.{i}.ff_out.weight     [d, f]
    model.transformer.ln_f.weight                  [d]
    model.transformer.ff_out.weight                [embedding_size, d]

q, k, v are fused into megatron's per-group layout; fc1 = [ff_proj; up_proj], fc2 = the block's ff_out.
"""
from __future__ import annotations

import torch

from mlfm_scale.config import ModelSection
from mlfm_scale.convert.plan import (
    ConversionPlan,
    Entry,
    check,
    grouped_qkv,
    network_entries,
    require_config,
    require_known_keys,
    require_shapes,
)
from mlfm_scale.convert.source import SafetensorsSource
from mlfm_scale.errors import UserError
from mlfm_scale.model.mlfm import padded_vocab_size

FORMAT = "llada"
EMBEDDING, FINAL_NORM = "model.transformer.wte.weight", "model.transformer.ln_f.weight"
HEAD, BLOCK = "model.transformer.ff_out.weight", "model.transformer.blocks."
MASK_ID = 126336  # LLaDA's [MASK] (the reference generate.py / GUIDELINES.md); config.json normally names it
# config.json fields that fix the architecture → (the value we convert, LLaDA's default when the field is absent,
# from configuration_llada.py's ModelConfig)
ARCHITECTURE = {
    "block_type": ("llama", "sequential"), "layer_norm_type": ("rms", "default"), "activation_type": ("silu", "swiglu"),
    "rope": (True, False), "alibi": (False, False), "attention_layer_norm": (False, False),
    "weight_tying": (False, True), "scale_logits": (False, False), "input_emb_norm": (False, False),
    "include_bias": (False, False), "include_qkv_bias": (False, False), "layer_norm_with_affine": (True, True),
}


def plan(cfg: ModelSection, source: SafetensorsSource) -> ConversionPlan:
    """Check a LLaDA directory (config.json and tensors) against ``cfg`` and list its conversion."""
    config = source.config()
    check(config is not None, f"{source.path} has no config.json beside its weights: point at the Hugging Face "
                              "LLaDA directory (config.json + *.safetensors)")
    keys = set(source.keys())
    check(EMBEDDING in keys, f"{source.path} is not a LLaDA checkpoint: it has no {EMBEDDING} (its keys begin "
                             f"{', '.join(sorted(keys)[:3])}); choose the format that wrote it")
    unsupported = {k: config.get(k, default) for k, (want, default) in ARCHITECTURE.items()
                   if config.get(k, default) != want}
    if unsupported:
        raise UserError(f"{source.path}/config.json describes a LLaDA variant we do not convert ("
                        + ", ".join(f"{k}={v!r}" for k, v in unsupported.items()) + "); we convert LLaDA's llama "
                        "block: RMSNorm, SiLU-gated MLP, RoPE, no biases, untied head")

    absent = [k for k in ("n_layers", "d_model", "n_heads") if not isinstance(config.get(k), int)]
    check(not absent, f"{source.path}/config.json lacks {', '.join(absent)}: not a LLaDA config")
    layers, d, heads = config["n_layers"], config["d_model"], config["n_heads"]
    # the rest as LLaDA reads them: its defaults where absent
    groups = config.get("n_kv_heads") or (1 if config.get("multi_query_attention") else heads)
    ffn = config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * d
    theta, eps = float(config.get("rope_theta", 10000.0)), float(config.get("rms_norm_eps", 1e-5))
    vocab = source.shape(EMBEDDING)[0]  # LLaDA's embedding_size: the token ids the table (and the head) covers
    found = {
        "num_layers": (layers, f"config.json has n_layers={layers}"),
        "hidden_size": (d, f"config.json has d_model={d}"),
        "num_heads": (heads, f"config.json has n_heads={heads}"),
        "num_query_groups": (groups, f"config.json has {groups} key/value heads (n_kv_heads)"),
        "ffn_hidden_size": (ffn, f"config.json has an MLP width of {ffn} (mlp_hidden_size)"),
        "rope_base": (theta, f"config.json has rope_theta={theta:g}"),
        "norm_eps": (eps, f"config.json has rms_norm_eps={eps:g}"),
    }
    if cfg.vocab_size is not None:
        found["vocab_size"] = (vocab, f"its embedding table has {vocab} rows ({EMBEDDING})")
    require_config(f"{source.path}/config.json", found, cfg)
    mask_id = MASK_ID if config.get("mask_token_id") is None else config["mask_token_id"]
    check(0 <= mask_id < vocab, f"config.json's mask_token_id {mask_id} is outside its {vocab}-row embedding table")

    head_dim = d // heads
    names = {"attn_norm": (d,), "q_proj": (d, d), "k_proj": (groups * head_dim, d), "v_proj": (groups * head_dim, d),
             "attn_out": (d, d), "ff_norm": (d,), "ff_proj": (ffn, d), "up_proj": (ffn, d), "ff_out": (d, ffn)}
    shapes = {EMBEDDING: (vocab, d), FINAL_NORM: (d,), HEAD: (vocab, d)}
    shapes |= {f"{BLOCK}{i}.{n}.weight": s for i in range(layers) for n, s in names.items()}
    require_known_keys(source, set(shapes), "LLaDA")
    require_shapes(source, shapes)

    padded = padded_vocab_size(vocab, 1)
    qkv_rows = (heads + 2 * groups) * head_dim
    entries = network_entries(source, padded, d, (EMBEDDING, FINAL_NORM, HEAD),
                              (_layer(source, i, d, qkv_rows, ffn, groups) for i in range(layers)))
    return ConversionPlan(vocab_size=vocab, mask_id=mask_id, entries=entries, source_format=FORMAT,
                          notes={"source": str(source.path), "config": config})


def _layer(source: SafetensorsSource, i: int, d: int, qkv_rows: int, ffn: int, groups: int) -> list[Entry]:
    """Layer ``i``'s entries, in our parameter order."""
    src, ours = f"{BLOCK}{i}.", f"layers.{i}."

    def get(*names: str) -> list[torch.Tensor]:
        return [source.get(f"{src}{n}.weight") for n in names]

    return [
        Entry(ours + "input_layernorm.weight", (d,), lambda: get("attn_norm")[0]),
        Entry(ours + "self_attention.linear_qkv.weight", (qkv_rows, d),
              lambda: grouped_qkv(*get("q_proj", "k_proj", "v_proj"), groups)),
        Entry(ours + "self_attention.linear_proj.weight", (d, d), lambda: get("attn_out")[0]),
        Entry(ours + "pre_mlp_layernorm.weight", (d,), lambda: get("ff_norm")[0]),
        # ff_proj goes through the SiLU (the gate), up_proj is the linear branch
        Entry(ours + "mlp.linear_fc1.weight", (2 * ffn, d), lambda: torch.cat(get("ff_proj", "up_proj"))),
        Entry(ours + "mlp.linear_fc2.weight", (d, ffn), lambda: get("ff_out")[0]),
    ]
