"""Tiny SMDM and LLaDA checkpoints with the real key names and shapes; plain-PyTorch forwards written from each
source's own semantics (token ids → logits: bidirectional, RMSNorm, RoPE, SwiGLU, grouped-query attention); and
the converted MLFMModel's logits at any TP size."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mlfm_scale.config import ModelSection

LAYERS, WIDTH, HEADS, FFN = 2, 32, 4, 64
SMDM_VOCAB = 50  # output rows; the table has one more, the mask
LLADA_VOCAB, LLADA_MASK, LLADA_THETA = 60, 57, 500000.0


def model_cfg(groups: int = HEADS, **overrides) -> ModelSection:
    """Our model at the tiny sources' shape."""
    return ModelSection(**{"num_layers": LAYERS, "hidden_size": WIDTH, "num_heads": HEADS, "num_query_groups": groups,
                           "ffn_hidden_size": FFN, "time_embed_dim": 16, "time_hidden_size": 24} | overrides)


# ------------------------------------------------------------------------------------- shared semantics
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """x [b, heads, s, hd], positions 0…s−1; the two halves of the head dimension rotate together."""
    s, hd = x.shape[-2:]
    angles = torch.arange(s, dtype=torch.float32)[:, None] / base ** (torch.arange(0, hd, 2) / hd)
    angles = torch.cat([angles, angles], -1)
    x1, x2 = x.chunk(2, -1)
    return x * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, base: float) -> torch.Tensor:
    """q [b, s, h, hd], k and v [b, s, g, hd] (key/value head j serves query heads j·h/g …) → [b, s, h·hd],
    no mask (bidirectional)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(rope(q, base), rope(k, base), v)
    return out.transpose(1, 2).flatten(2)


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Norm weights near 1, everything else N(0, 0.2²): a mis-mapped tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    return {k: (1 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else 0.2 * torch.randn(s, generator=g)
            for k, s in shapes.items()}


def write(state: dict[str, torch.Tensor], directory: Path, shards: int = 1, index: bool = True,
          config: dict | None = None) -> Path:
    """``state`` as ``model.safetensors``, or ``shards`` files (with an index unless told not), plus config.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    if shards == 1:
        save_file(state, directory / "model.safetensors")
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k].contiguous() for k in keys[i::shards]}
            save_file(part, directory / name)
            weight_map |= dict.fromkeys(part, name)
        if index:
            (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


# ------------------------------------------------------------------------------------------------ SMDM
def smdm_shapes(groups: int = HEADS, layers: int = LAYERS, d: int = WIDTH, heads: int = HEADS, ffn: int = FFN,
                vocab: int = SMDM_VOCAB) -> dict[str, tuple[int, ...]]:
    hd = d // heads
    shapes = {"transformer.wte.weight": (vocab + 1, d), "lm_head.weight": (vocab, d), "transformer.ln_f.weight": (d,)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        shapes |= {p + "norm_1.weight": (d,), p + "attn.attn.weight": ((heads + 2 * groups) * hd, d),
                   p + "attn.proj.weight": (d, d), p + "norm_2.weight": (d,), p + "mlp.swiglu.w1.weight": (ffn, d),
                   p + "mlp.swiglu.w2.weight": (ffn, d), p + "mlp.swiglu.w3.weight": (d, ffn)}
    return shapes


def smdm_state(groups: int = HEADS, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_state(smdm_shapes(groups), seed)


def smdm_forward(state: dict[str, torch.Tensor], ids: torch.Tensor, groups: int = HEADS) -> torch.Tensor:
    """LitGPT TransEncoder: ids [b, s] → logits [b, s, V] (RoPE base 10000, eps 1e-5)."""
    b, s = ids.shape
    hd = WIDTH // HEADS
    x = state["transformer.wte.weight"][ids]
    for i in range(LAYERS):
        w = {k.removeprefix(f"transformer.h.{i}."): t for k, t in state.items() if k.startswith(f"transformer.h.{i}.")}
        # the fused projection, viewed per query group as [its q heads, k, v]
        qkv = (rms_norm(x, w["norm_1.weight"]) @ w["attn.attn.weight"].T).view(b, s, groups, HEADS // groups + 2, hd)
        q, k, v = qkv.split((HEADS // groups, 1, 1), dim=-2)
        y = attention(q.reshape(b, s, HEADS, hd), k.reshape(b, s, groups, hd), v.reshape(b, s, groups, hd), 1e4)
        x = x + y @ w["attn.proj.weight"].T
        h = rms_norm(x, w["norm_2.weight"])
        gate, up = h @ w["mlp.swiglu.w1.weight"].T, h @ w["mlp.swiglu.w2.weight"].T
        x = x + (F.silu(gate) * up) @ w["mlp.swiglu.w3.weight"].T
    return rms_norm(x, state["transformer.ln_f.weight"]) @ state["lm_head.weight"].T


# ----------------------------------------------------------------------------------------------- LLaDA
def llada_config(kv_heads: int = HEADS, **overrides) -> dict:
    """A config.json as LLaDA-8B's, at the tiny shape."""
    return {"model_type": "llada", "architectures": ["LLaDAModelLM"], "block_type": "llama", "activation_type": "silu",
            "layer_norm_type": "rms", "rope": True, "alibi": False, "attention_layer_norm": False,
            "weight_tying": False, "include_bias": False, "include_qkv_bias": False, "scale_logits": False,
            "input_emb_norm": False, "d_model": WIDTH, "n_heads": HEADS, "n_kv_heads": kv_heads, "n_layers": LAYERS,
            "mlp_hidden_size": FFN, "mlp_ratio": 4, "rope_theta": LLADA_THETA, "rms_norm_eps": 1e-5,
            "vocab_size": LLADA_VOCAB, "embedding_size": LLADA_VOCAB, "mask_token_id": LLADA_MASK,
            "eos_token_id": 3, "pad_token_id": 3} | overrides


def llada_state(kv_heads: int = HEADS, seed: int = 0, vocab: int = LLADA_VOCAB) -> dict[str, torch.Tensor]:
    kv = kv_heads * (WIDTH // HEADS)
    shapes = {"model.transformer.wte.weight": (vocab, WIDTH), "model.transformer.ln_f.weight": (WIDTH,),
              "model.transformer.ff_out.weight": (vocab, WIDTH)}
    for i in range(LAYERS):
        p = f"model.transformer.blocks.{i}."
        shapes |= {p + "attn_norm.weight": (WIDTH,), p + "q_proj.weight": (WIDTH, WIDTH),
                   p + "k_proj.weight": (kv, WIDTH), p + "v_proj.weight": (kv, WIDTH),
                   p + "attn_out.weight": (WIDTH, WIDTH), p + "ff_norm.weight": (WIDTH,),
                   p + "ff_proj.weight": (FFN, WIDTH), p + "up_proj.weight": (FFN, WIDTH),
                   p + "ff_out.weight": (WIDTH, FFN)}
    return random_state(shapes, seed)


def llada_forward(state: dict[str, torch.Tensor], ids: torch.Tensor, kv_heads: int = HEADS) -> torch.Tensor:
    """LLaDAModel with LLaDALlamaBlocks: ids [b, s] → logits [b, s, embedding_size]."""
    b, s = ids.shape
    hd = WIDTH // HEADS
    x = state["model.transformer.wte.weight"][ids]
    for i in range(LAYERS):
        p = f"model.transformer.blocks.{i}."
        w = {k.removeprefix(p): t for k, t in state.items() if k.startswith(p)}
        h = rms_norm(x, w["attn_norm.weight"])
        q, k, v = (h @ w[f"{n}_proj.weight"].T for n in "qkv")
        y = attention(q.view(b, s, HEADS, hd), k.view(b, s, kv_heads, hd), v.view(b, s, kv_heads, hd), LLADA_THETA)
        x = x + y @ w["attn_out.weight"].T
        h = rms_norm(x, w["ff_norm.weight"])
        x = x + (F.silu(h @ w["ff_proj.weight"].T) * (h @ w["up_proj.weight"].T)) @ w["ff_out.weight"].T
    return rms_norm(x, state["model.transformer.ln_f.weight"]) @ state["model.transformer.ff_out.weight"].T


# ------------------------------------------------------------------------------------- the converted model
def inputs(vocab: int, b: int = 2, s: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(1))


GAMMAS = (-3.0, 2.5)  # any γ: the modulation is zero-initialised, so a converted layer is the source's plain layer


def converted_logits(fmt: str, path: Path, cfg: ModelSection, ids: torch.Tensor, tp: int = 1) -> list[torch.Tensor]:
    """Convert ``path``, load this TP rank's slices into MLFMModel (fp32, the current megatron groups) →
    the gathered logits [b, s, V_pad] of model(E[ids], γ) for each γ in GAMMAS."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mlfm_scale.convert.formats import plan_for
    from mlfm_scale.convert.plan import model_name
    from mlfm_scale.model.mlfm import MLFMModel
    from mlfm_scale.train.universal import split_tp, tp_partition

    plan = plan_for(fmt, cfg, path)
    model = MLFMModel(cfg, plan.vocab_size, tp=tp)
    rank = ps.get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for entry in plan.entries:
            params[model_name(entry.name)].copy_(split_tp(entry.full(), tp_partition(entry.name), tp, rank))
        z = model.embed(ids)
        out = []
        for gamma in GAMMAS:
            logits = model(z, torch.full((ids.size(0),), gamma))
            parts = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
            out.append(torch.cat(parts, -1))
    return out


def tp_worker(fmt: str, path: Path, cfg: ModelSection, ids: torch.Tensor) -> list[torch.Tensor]:
    """:func:`converted_logits` at TP = world size, in a spawned process (tests.distributed.run_distributed)."""
    import torch.distributed as dist

    from mlfm_scale.config import ParallelSection
    from mlfm_scale.parallel.state import model_parallel

    tp = dist.get_world_size()
    with model_parallel(ParallelSection(tp=tp), seed=0):
        return converted_logits(fmt, path, cfg, ids, tp)


class ShapesOnly:
    """A source of shapes without tensors (``plan`` reads only shapes): checks on full-size layouts for free."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], config: dict | None = None):
        self.path, self._shapes, self._config = Path("shapes-only"), shapes, config

    def keys(self) -> list[str]:
        return list(self._shapes)

    def where(self, key: str) -> Path:
        return self.path

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def config(self) -> dict | None:
        return self._config
