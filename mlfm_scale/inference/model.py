"""The MLFM network in plain PyTorch, loading an export directory (``mlfm export``); CPU or one GPU.

Same computation as ``model.mlfm.MLFMModel`` at TP = 1 (MLFM.md, Model), with the padded vocabulary removed:

    ids ──embed──▶ e [b, s, d];   z [b, s, d], γ [b] ──AdaLN layers──▶ RMSNorm ──▶ logits [b, s, V] (float32)

Parameter names are the export's (``embedding.weight``, ``gamma_embedding.*``, ``layers.{i}.*``,
``final_norm.weight``, ``output_layer.weight``), so a state dict loads as it is.
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
from mlfm_scale.model.common import GammaEmbedding, rope_frequencies, segment_starts_and_positions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIG, GENERATION_CONFIG, TOKENIZER = "config.json", "generation_config.json", "tokenizer.json"
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE on x [b, s, heads, dim] with freqs [b, s, 1, dim] (non-interleaved halves, megatron's layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * freqs.cos().to(x.dtype) + torch.cat([-x2, x1], dim=-1) * freqs.sin().to(x.dtype)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention; qkv rows grouped per head as [q_h; k_h; v_h] (megatron's order)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.linear_qkv = nn.Linear(d, 3 * d, bias=False)
        self.linear_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        """x [b, s, d], freqs [b, s, 1, head_dim], blocked Bool[b, 1, s, s] (True = may not attend) → [b, s, d]."""
        b, s, d = x.shape
        q, k, v = self.linear_qkv(x).view(b, s, self.heads, 3 * (d // self.heads)).chunk(3, dim=-1)
        q, k = rotate(q, freqs), rotate(k, freqs)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=None if blocked is None else ~blocked)
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
        self.self_attention = SelfAttention(d, cfg.num_heads)
        self.pre_mlp_layernorm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.mlp = SwiGLU(d, cfg.ffn_hidden_size)
        self.modulation = nn.Linear(cfg.time_hidden_size, 6 * d)

    def forward(self, x, cond, freqs, blocked):
        """x [b, s, d], cond [b, hidden_c] → [b, s, d]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond)).unsqueeze(1).chunk(6, dim=-1)
        x = x + (1 + gate1) * self.self_attention(self.input_layernorm(x) * (1 + scale1) + shift1, freqs, blocked)
        return x + (1 + gate2) * self.mlp(self.pre_mlp_layernorm(x) * (1 + scale2) + shift2)


class MLFMForInference(nn.Module):
    """An exported MLFM: ``from_pretrained(dir)``, then ``embed`` / ``forward`` / the metadata a sampler needs."""

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
        self.gamma_embedding = GammaEmbedding(c.time_embed_dim, c.time_hidden_size)
        self.layers = nn.ModuleList(AdaLNLayer(c) for _ in range(c.num_layers))
        self.final_norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps)
        self.output_layer = nn.Linear(c.hidden_size, self.vocab_size, bias=False)
        self.generation_config: dict = {}

    # ------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, export_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> MLFMForInference:
        """Load an export directory onto ``device``, in ``dtype`` (None: the exported dtype)."""
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
        model.load_state_dict(read_weights(export_dir), strict=True, assign=True)
        generation = export_dir / GENERATION_CONFIG
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
    def forward(self, z: torch.Tensor, gamma: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """z [b, s, d], γ [b], optional segment ids Long[b, s] (attention stays within a segment, RoPE restarts
        in each) → logits float32 [b, s, V]."""
        b, s, _ = z.shape
        if segment_ids is None:
            segment_ids = torch.zeros(b, s, dtype=torch.long, device=z.device)
        _, positions = segment_starts_and_positions(segment_ids)
        c = self.model_cfg
        freqs = rope_frequencies(positions, c.hidden_size // c.num_heads, c.rope_base).transpose(0, 1)
        single = bool((segment_ids == segment_ids[:, :1]).all())
        blocked = None if single else segment_ids[:, None, :, None] != segment_ids[:, None, None, :]
        dtype = self.embedding.weight.dtype
        cond = self.gamma_embedding(gamma.to(z.device))
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


def read_weights(export_dir: Path) -> dict[str, torch.Tensor]:
    """The export's tensors: ``model.safetensors``, or the shards named by ``model.safetensors.index.json``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = export_dir / WEIGHTS_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS]
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
