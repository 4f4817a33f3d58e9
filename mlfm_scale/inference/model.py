"""The MLFM network in plain PyTorch, loading an export directory (``mlfm export``); CPU or one GPU.

Same computation as ``model.mlfm.MLFMModel`` at TP = 1 (MLFM.md, Model), with the padded vocabulary removed:

    ids ──embed──▶ e [b, s, d];   z [b, s, d], γ [b] ──AdaLN layers──▶ RMSNorm ──▶ logits [b, s, V] (float32)

Parameter names are the export's (``embedding.weight``, ``gamma_embedding.*``, ``layers.{i}.*``,
``final_norm.weight``, ``output_layer.weight``; a flow-map student's ``target_gamma_embedding.*``), so a state
dict loads as it is.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from mlfm_scale.config import ModelSection, ObjectiveSection, explain
from mlfm_scale.errors import UserError
from mlfm_scale.flow.decision import DecisionWindow, window_of
from mlfm_scale.flow.schedules import GammaSchedule, active_curve_for, gamma_schedule_for
from mlfm_scale.model.common import (
    GammaEmbedding,
    GammaFeatures,
    TargetGammaEmbedding,
    conditioning_width,
    merge_adapters,
    rope_frequencies,
    segment_starts_and_positions,
    time_mlp,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIG, GENERATION_CONFIG, TOKENIZER = "config.json", "generation_config.json", "tokenizer.json"
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
ADAPTERS, ADAPTER_CONFIG = "adapters.safetensors", "adapter_config.json"  # `mlfm export --adapters-only`


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE on x [b, s, heads, dim] with freqs [b, s, 1, dim] (non-interleaved halves, megatron's layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * freqs.cos().to(x.dtype) + torch.cat([-x2, x1], dim=-1) * freqs.sin().to(x.dtype)


class SelfAttention(nn.Module):
    """Bidirectional (grouped-query) attention; qkv rows grouped per query group as [q heads of the group; k; v]
    (megatron's order; one group per head without GQA)."""

    def __init__(self, d: int, heads: int, groups: int):
        super().__init__()
        self.heads, self.groups, self.head_dim = heads, groups, d // heads
        self.linear_qkv = nn.Linear(d, (heads + 2 * groups) * self.head_dim, bias=False)
        self.linear_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        """x [b, s, d], freqs [b, s, 1, head_dim], blocked Bool[b, 1, s, s] (True = may not attend) → [b, s, d]."""
        b, s, d = x.shape
        per_group, hd = self.heads // self.groups, self.head_dim
        q, k, v = self.linear_qkv(x).view(b, s, self.groups, (per_group + 2) * hd).split(
            [per_group * hd, hd, hd], dim=-1)
        q, k = rotate(q.reshape(b, s, self.heads, hd), freqs), rotate(k, freqs)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=None if blocked is None else ~blocked,
                                             enable_gqa=self.groups != self.heads)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(d, 2 * ffn, bias=False)  # rows: [gate; up]
        self.linear_fc2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class AdaLNLayer(nn.Module):
    """h = x + (1 + gate1)·Attn(norm1(x)(1 + scale1) + shift1);
    out = h + (1 + gate2)·MLP(norm2(h)(1 + scale2) + shift2)."""

    def __init__(self, cfg: ModelSection):
        super().__init__()
        d = cfg.hidden_size
        self.input_layernorm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.self_attention = SelfAttention(d, cfg.num_heads, cfg.query_groups)
        self.pre_mlp_layernorm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.mlp = SwiGLU(d, cfg.ffn_hidden_size)
        self.modulation = nn.Linear(cfg.time_hidden_size, 6 * d)
        if cfg.time_mlp == "per_layer":
            self.time_mlp = time_mlp(cfg.time_embed_dim, cfg.time_hidden_size)

    def forward(self, x, cond, freqs, blocked):
        """x [b, s, d], cond [b, hidden_c] (per_layer: the sinusoidal features) → [b, s, d]."""
        if hasattr(self, "time_mlp"):
            cond = self.time_mlp(cond)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond)).unsqueeze(1).chunk(6, dim=-1)
        x = x + (1 + gate1) * self.self_attention(self.input_layernorm(x) * (1 + scale1) + shift1, freqs, blocked)
        return x + (1 + gate2) * self.mlp(self.pre_mlp_layernorm(x) * (1 + scale2) + shift2)


class MLFMForInference(nn.Module):
    """An exported MLFM: ``from_pretrained(dir)``, then ``embed`` / ``forward`` / the metadata a sampler needs.
    A flow-map student (``model.flow_map``, ``mlfm distill``) has a second γ embedding for a jump's target."""

    def __init__(self, config: dict, export_dir: Path | None = None):
        super().__init__()
        if config.get("architecture") != "MLFM":
            raise UserError(f"{CONFIG} describes architecture {config.get('architecture')!r}, not 'MLFM'")
        self.config, self.export_dir = config, export_dir
        self.model_cfg = ModelSection.model_validate(config["model"])
        self.objective_cfg = ObjectiveSection.model_validate(config["objective"])
        self.vocab_size, self.seq_len, self.sigma = config["vocab_size"], config["seq_len"], config["sigma"]
        self.mask_id, self.eos_id, self.pad_id = config["mask_id"], config["eos_id"], config["pad_id"]
        c = self.model_cfg
        self.embedding = nn.Embedding(self.vocab_size, c.hidden_size)
        self.gamma_embedding = (GammaFeatures(c.time_embed_dim) if c.time_mlp == "per_layer"
                                else GammaEmbedding(c.time_embed_dim, c.time_hidden_size))
        self.target_gamma_embedding = (TargetGammaEmbedding(c.time_embed_dim, c.time_hidden_size,
                                                            conditioning_width(c)) if c.flow_map else None)
        self.layers = nn.ModuleList(AdaLNLayer(c) for _ in range(c.num_layers))
        self.final_norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps)
        self.output_layer = nn.Linear(c.hidden_size, self.vocab_size, bias=False)
        self.generation_config: dict = {}

    # ------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, export_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, adapters: str | Path | None = None) -> MLFMForInference:
        """Load an export directory onto ``device``, in ``dtype`` (None: the exported dtype); ``adapters``: an
        ``mlfm export --adapters-only`` directory applied on top (its LoRA merged into the weights, its AdaLN
        and γ MLPs, γ curve, decision window and sampler settings taking the base's place)."""
        export_dir = Path(export_dir)
        if not (export_dir / CONFIG).is_file():
            raise UserError(f"{export_dir} has no {CONFIG}: not an `mlfm export` directory")
        try:
            config = json.loads((export_dir / CONFIG).read_text())
            with torch.device("meta"):
                model = cls(config, export_dir)
        except (json.JSONDecodeError, KeyError, ValidationError) as e:
            what = explain(e) if isinstance(e, ValidationError) else f"{type(e).__name__}: {e}"
            raise UserError(f"{export_dir / CONFIG} is not a config this version reads ({what}); re-export the "
                            "checkpoint with this version of `mlfm export`") from None
        weights = read_weights(export_dir)
        if adapters is not None:
            config = apply_adapters(config, weights, Path(adapters))
            with torch.device("meta"):
                model = cls(config, export_dir)
        model.load_state_dict(weights, strict=True, assign=True)
        generation = (Path(adapters) if adapters is not None else export_dir) / GENERATION_CONFIG  # the run's sampler
        model.generation_config = json.loads(generation.read_text()) if generation.is_file() else {}
        return model.to(device=device, dtype=dtype or DTYPES[config["dtype"]]).eval()

    # ---------------------------------------------------------------------------------- embeddings
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids Long[b, s] → e [b, s, d]."""
        return self.embedding(ids)

    def mask_embedding(self) -> torch.Tensor:
        """m = E[mask_id], [d]."""
        return self.embedding.weight[self.mask_id]

    def embedding_table(self) -> torch.Tensor:
        """E [V, d] (the real vocabulary), for x̂0 = softmax(logits)·E."""
        return self.embedding.weight

    # ------------------------------------------------------------------------------------- forward
    @property
    def flow_map(self) -> bool:
        """Whether this is a flow-map student, whose ``forward`` takes a jump target (``method=flowmap``)."""
        return self.target_gamma_embedding is not None

    def forward(self, z: torch.Tensor, gamma: torch.Tensor, segment_ids: torch.Tensor | None = None,
                gamma_target: torch.Tensor | None = None) -> torch.Tensor:
        """z [b, s, d], γ [b], optional segment ids Long[b, s] (attention stays within a segment, RoPE restarts
        in each), a flow-map student's jump target γ_t [b] (default γ: the posterior at γ) → logits float32
        [b, s, V]."""
        b, s, _ = z.shape
        if segment_ids is None:
            segment_ids = torch.zeros(b, s, dtype=torch.long, device=z.device)
        _, positions = segment_starts_and_positions(segment_ids)
        c = self.model_cfg
        freqs = rope_frequencies(positions, c.hidden_size // c.num_heads, c.rope_base).transpose(0, 1)
        single = bool((segment_ids == segment_ids[:, :1]).all())
        blocked = None if single else segment_ids[:, None, :, None] != segment_ids[:, None, None, :]
        dtype = self.embedding.weight.dtype
        cond = self.gamma_embedding(gamma.to(z.device)).to(dtype)
        if self.target_gamma_embedding is not None:
            target = gamma if gamma_target is None else gamma_target
            cond = cond + self.target_gamma_embedding(target.to(z.device)).to(dtype)
        elif gamma_target is not None:
            raise UserError("this model has no target-time embedding: only a flow-map student (model.flow_map, "
                            "`mlfm distill`) takes a jump target")
        x = z.to(dtype)
        for layer in self.layers:
            x = layer(x, cond, freqs, blocked)
        return self.output_layer(self.final_norm(x)).float()

    # ------------------------------------------------------------------------------- sampler needs
    def gamma_schedule(self) -> GammaSchedule:
        """The training γ distribution, with the learned active curve when the export carries one."""
        curve = active_curve_for(self.objective_cfg)
        if curve is not None and self.config.get("gamma_curve") is not None:
            curve.load_state_dict(curve_from_json(self.config["gamma_curve"]))
        return gamma_schedule_for(self.objective_cfg, curve)

    def decision_window(self) -> DecisionWindow | None:
        """Where the model decides its tokens (config.json ``decision``, recorded by training or ``mlfm
        diagnose``), or None when the export carries no measured window."""
        return window_of(self.config.get("decision"))

    def tokenizer(self):
        """The export's ``tokenizers.Tokenizer``."""
        from tokenizers import Tokenizer

        path = None if self.export_dir is None else self.export_dir / TOKENIZER
        if path is None or not path.is_file():
            raise UserError(f"no {TOKENIZER} in {self.export_dir}: export from a checkpoint whose data manifest "
                            "names its tokenizer")
        return Tokenizer.from_file(str(path))


def curve_to_json(state: dict) -> dict:
    """``ActiveGammaCurve.state_dict()`` with its tensors as lists (and their dtypes), for config.json."""
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "values": v.tolist()} if torch.is_tensor(v) else v
            for k, v in state.items()}


def curve_from_json(state: dict) -> dict:
    """Inverse of :func:`curve_to_json`."""
    return {k: torch.tensor(v["values"], dtype=getattr(torch, v["dtype"])) if isinstance(v, dict) else v
            for k, v in state.items()}


def apply_adapters(config: dict, weights: dict[str, torch.Tensor], adapter_dir: Path) -> dict:
    """Merge ``adapter_dir``'s LoRA into ``weights`` and replace the tensors it trained (in place); returns the
    config of the adapted model."""
    from mlfm_scale.config import LoRASection

    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise UserError(f"{adapter_dir} has no {ADAPTER_CONFIG}: not an `mlfm export --adapters-only` directory")
    adapted = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if adapted["vocab_size"] != config["vocab_size"] or adapted["mask_id"] != config["mask_id"]:
        raise UserError(f"the adapters in {adapter_dir} were trained with another vocabulary than this base")
    tensors = read_weights(adapter_dir, ADAPTERS)
    merge_adapters(weights, tensors, LoRASection.model_validate(adapted["model"]["lora"]))
    weights.update({n: t.to(weights[n].dtype) if n in weights else t for n, t in tensors.items()})
    model = dict(adapted["model"], lora=LoRASection().model_dump(mode="json"))
    return {**config, "model": model, "merged_lora": adapted["model"]["lora"], "adapters": str(adapter_dir),
            **{k: adapted[k] for k in ("objective", "gamma_curve", "decision", "sigma")}}


def read_weights(export_dir: Path, single: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """The export's tensors: ``single`` (``model.safetensors``), or the shards named by
    ``model.safetensors.index.json``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = export_dir / WEIGHTS_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [single]
    tensors = {}
    for name in files:
        path = export_dir / name
        if not path.is_file():
            raise UserError(f"{path} is missing: re-run `mlfm export`")
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({e}): re-run `mlfm export`") from None
    return tensors
