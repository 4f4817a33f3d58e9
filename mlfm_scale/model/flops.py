"""Model FLOPs per token, for MFU (model FLOP/s ÷ peak FLOP/s)."""
from __future__ import annotations

from mlfm_scale.config import ModelSection


def flops_per_token(cfg: ModelSection, vocab_size: int, seq_len: int, training: bool = True,
                    posterior_mean: bool = True) -> float:
    """Matmul FLOPs per token: 2 per multiply-add in the forward pass, ×3 with the backward.

    Per layer: QKV + output projections 8d², SwiGLU 6·d·ffn, attention scores and values 4·s·d (bidirectional,
    every token attends to the whole block). Output layer 2·d·V; the MLFM posterior mean softmax(logits)·E
    adds another 2·d·V. The γ embedding and AdaLN run once per sequence and are left out.
    """
    d, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    per_layer = 8 * d * d + 6 * d * ffn + 4 * seq_len * d
    forward = cfg.num_layers * per_layer + 2 * d * vocab_size * (2 if posterior_mean else 1)
    return float(forward * (3 if training else 1))


def parameter_count(cfg: ModelSection, vocab_size: int) -> int:
    """Parameters of the MLFM network: embeddings, output layer, layers (norms and AdaLN included), γ MLP."""
    d, ffn, c = cfg.hidden_size, cfg.ffn_hidden_size, cfg.time_hidden_size
    layer = 4 * d * d + 3 * d * ffn + 2 * d + (c + 1) * 6 * d
    gamma_mlp = (cfg.time_embed_dim + 1) * c + (c + 1) * c
    return 2 * vocab_size * d + cfg.num_layers * layer + d + gamma_mlp
