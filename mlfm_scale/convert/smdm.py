"""SMDM (LitGPT ``Diff_LLaMA``, github.com/ML-GSAI/SMDM ``lit_gpt/diffmodel.py``) safetensors → our base weights.

SMDM's ``TransEncoder`` is a bidirectional pre-norm LLaMA: RMSNorm (eps 1e-5), RoPE base 10000 on the full
head dimension (non-interleaved halves), no biases, untied head. Its tensors:

    transformer.wte.weight            [V + 1, d]   row V is the mask token's embedding (mask id = V)
    transformer.h.{i}.norm_1.weight   [d]
    transformer.h.{i}.attn.attn.weight  [(h + 2g)·hd, d]  fused, per query group [its q heads; k; v]
    transformer.h.{i}.attn.proj.weight  [d, d]
    transformer.h.{i}.norm_2.weight   [d]
    transformer.h.{i}.mlp.swiglu.{w1,w2,w3}.weight   xformers SwiGLU: w3(silu(w1·x) * w2·x)
    transformer.ln_f.weight           [d]
    lm_head.weight                    [V, d]       no mask logit

The fused QKV already has megatron's grouping, so it is copied as is; fc1 = [w1; w2], fc2 = w3. Our output
rows from V on (the mask token's and the padding) are zeros.
"""
from __future__ import annotations

import re

import torch

from mlfm_scale.config import ModelSection
from mlfm_scale.convert.plan import (
    ConversionPlan,
    Entry,
    check,
    network_entries,
    require_config,
    require_known_keys,
    require_shapes,
)
from mlfm_scale.convert.source import SafetensorsSource
from mlfm_scale.model.mlfm import padded_vocab_size

FORMAT = "smdm"
EMBEDDING, FINAL_NORM, HEAD = "transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"
LAYER = "transformer.h."
LAYER_INDEX = re.compile(r"^transformer\.h\.(\d+)\.")
ROPE_BASE, NORM_EPS = 10000.0, 1e-5
# SMDM's Diff_LLaMA shapes (lit_gpt/config.py), (layers, width) → (name, heads); every one is MHA. The head count
# does not show in an MHA checkpoint's shapes, so a checkpoint of one of these shapes is checked against it.
PRESETS = {
    (6, 256): ("6M", 4), (8, 384): ("19M", 6), (8, 512): ("34M", 8), (9, 576): ("48M", 9), (10, 640): ("66M", 10),
    (13, 640): ("85M", 10), (16, 640): ("75M", 8), (12, 768): ("113M", 12), (15, 768): ("142M", 12),
    (18, 768): ("170M", 12), (14, 896): ("180M", 14), (16, 896): ("206M", 14), (18, 896): ("231M", 14),
    (16, 1024): ("268M", 16), (18, 1024): ("302M", 16), (20, 1024): ("336M", 16), (18, 1280): ("472M", 10),
    (21, 1280): ("551M", 10), (18, 1408): ("571M", 11), (24, 1280): ("629M", 10), (21, 1408): ("666M", 11),
    (19, 1536): ("717M", 12), (24, 1408): ("761M", 11), (22, 1536): ("831M", 12), (25, 1536): ("944M", 12),
    (20, 1792): ("1028M", 14), (24, 1792): ("1233M", 14), (22, 2048): ("1476M", 16), (25, 2048): ("1678M", 16),
    (28, 2176): ("2121M", 17),
}
OUR_CONFIGS = {"1028M": "configs/smdm-1028m.yaml"}


def plan(cfg: ModelSection, source: SafetensorsSource) -> ConversionPlan:
    """Check an SMDM checkpoint against ``cfg`` (every mismatch in one error) and list its conversion."""
    keys = set(source.keys())
    check(EMBEDDING in keys and HEAD in keys,
          f"{source.path} is not an SMDM (LitGPT Diff_LLaMA) checkpoint: it has no {EMBEDDING} and {HEAD} (its "
          f"keys begin {', '.join(sorted(keys)[:3])}); choose the format that wrote it")
    layers = 1 + max((int(m[1]) for k in keys if (m := LAYER_INDEX.match(k))), default=-1)
    check(layers > 0, f"{source.path} has no {LAYER}* layers: not a complete SMDM checkpoint")

    rows, d = source.shape(EMBEDDING)
    vocab = source.shape(HEAD)[0]
    ffn = source.shape(f"{LAYER}0.mlp.swiglu.w1.weight")[0]
    fused = source.shape(f"{LAYER}0.attn.attn.weight")[0]
    preset = PRESETS.get((layers, d))
    heads = preset[1] if preset else cfg.num_heads  # a shape SMDM did not publish: its heads cannot be checked
    head_dim = d // heads
    found = {
        "num_layers": (layers, f"it has {layers} layers ({LAYER}0–{layers - 1})"),
        "hidden_size": (d, f"its width is {d} ({EMBEDDING} is {rows}×{d})"),
        "ffn_hidden_size": (ffn, f"its SwiGLU width is {ffn} ({LAYER}0.mlp.swiglu.w1.weight has {ffn} rows)"),
    }
    if preset:
        found["num_heads"] = (heads, f"SMDM's Diff_LLaMA_{preset[0]} (this shape) has {heads} heads")
    found |= {
        "num_query_groups": ((fused // head_dim - heads) // 2,
                             f"its fused QKV has {fused} rows = ({heads} + 2·groups)·{head_dim}"),
        "rope_base": (ROPE_BASE, f"SMDM uses RoPE base {ROPE_BASE:g}"),
        "norm_eps": (NORM_EPS, f"SMDM's RMSNorm eps is {NORM_EPS:g}"),
    }
    if cfg.vocab_size is not None:
        found["vocab_size"] = (rows, f"its vocabulary is {rows} tokens including the mask ({EMBEDDING} rows)")
    config_hint = OUR_CONFIGS.get(preset[0]) if preset else None
    require_config(str(source.path), found, cfg, f", or use {config_hint}" if config_hint else "")
    check(rows == vocab + 1, f"{EMBEDDING} has {rows} rows and {HEAD} {vocab}: SMDM's table holds the output "
                             "vocabulary plus one mask row, so this is not an SMDM checkpoint")

    qkv_rows = (heads + 2 * cfg.query_groups) * head_dim
    names = {"norm_1": (d,), "attn.attn": (qkv_rows, d), "attn.proj": (d, d), "norm_2": (d,),
             "mlp.swiglu.w1": (ffn, d), "mlp.swiglu.w2": (ffn, d), "mlp.swiglu.w3": (d, ffn)}
    shapes = {EMBEDDING: (rows, d), FINAL_NORM: (d,), HEAD: (vocab, d)}
    shapes |= {f"{LAYER}{i}.{n}.weight": s for i in range(layers) for n, s in names.items()}
    require_known_keys(source, set(shapes), "SMDM")
    require_shapes(source, shapes)

    padded = padded_vocab_size(rows, 1)
    entries = network_entries(source, padded, d, (EMBEDDING, FINAL_NORM, HEAD),
                              (_layer(source, i, d, qkv_rows, ffn) for i in range(layers)))
    notes = {"source": str(source.path), "preset": f"Diff_LLaMA_{preset[0]}" if preset else None,
             "output_rows": vocab}
    return ConversionPlan(vocab_size=rows, mask_id=vocab, entries=entries, source_format=FORMAT, notes=notes)


def _layer(source: SafetensorsSource, i: int, d: int, qkv_rows: int, ffn: int) -> list[Entry]:
    """Layer ``i``'s entries, in our parameter order."""
    src, ours = f"{LAYER}{i}.", f"layers.{i}."

    def get(*names: str) -> list[torch.Tensor]:
        return [source.get(f"{src}{n}.weight") for n in names]

    return [
        Entry(ours + "input_layernorm.weight", (d,), lambda: get("norm_1")[0]),
        # LitGPT fuses QKV per query group [its q heads; k; v]: megatron's layout already
        Entry(ours + "self_attention.linear_qkv.weight", (qkv_rows, d), lambda: get("attn.attn")[0]),
        Entry(ours + "self_attention.linear_proj.weight", (d, d), lambda: get("attn.proj")[0]),
        Entry(ours + "pre_mlp_layernorm.weight", (d,), lambda: get("norm_2")[0]),
        # xformers' SwiGLU: w1 goes through the SiLU (the gate), w2 is the linear branch
        Entry(ours + "mlp.linear_fc1.weight", (2 * ffn, d), lambda: torch.cat(get("mlp.swiglu.w1", "mlp.swiglu.w2"))),
        Entry(ours + "mlp.linear_fc2.weight", (d, ffn), lambda: get("mlp.swiglu.w3")[0]),
    ]
