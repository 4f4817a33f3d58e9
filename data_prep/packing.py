"""Pack tokenised documents into fixed-length blocks (SMDM / MLFM style), keeping document boundaries.

Pretraining: documents are joined with EOS (``doc₀ EOS doc₁ EOS …``) and cut into ``seq_len`` blocks; the
last block of a chunk is padded and its ``length`` says how many positions are real. ``doc_starts`` lists
the offsets inside the block where a document (or the block) begins, so the model can restrict attention
to one document and restart RoPE positions there.

SFT: one example per block, ``prompt response EOS`` padded with EOS to ``seq_len`` (the padding EOS count
as response, as in LLaDA, so the model learns to stop); ``response_mask`` marks the response.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Blocks:
    """``n`` packed blocks. tokens: [n, seq_len]; lengths: [n] real positions; doc_starts: n int32 arrays;
    response_mask: [n, seq_len] uint8 (SFT only)."""

    tokens: np.ndarray
    lengths: np.ndarray
    doc_starts: list[np.ndarray]
    response_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, eos_id: int, pad_id: int,
                   dtype: np.dtype = np.int32) -> Blocks:
    """Join ``docs`` (token id lists) with EOS after each and cut into blocks of ``seq_len``."""
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum())
    n_blocks = -(-total // seq_len)
    stream = np.full(n_blocks * seq_len, pad_id, dtype=dtype)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    stream[:total] = _join_with_eos(docs, lengths, total, eos_id, dtype)
    block_lengths = np.full(n_blocks, seq_len, dtype=np.int32)
    if n_blocks:
        block_lengths[-1] = total - (n_blocks - 1) * seq_len
    cuts = np.searchsorted(starts, np.arange(n_blocks + 1) * seq_len)
    doc_starts = []
    for b in range(n_blocks):
        inside = (starts[cuts[b]:cuts[b + 1]] - b * seq_len).astype(np.int32)
        doc_starts.append(inside if len(inside) and inside[0] == 0 else np.concatenate(
            [np.zeros(1, np.int32), inside]))
    return Blocks(stream.reshape(n_blocks, seq_len), block_lengths, doc_starts)


def _join_with_eos(docs: Sequence[Sequence[int]], lengths: np.ndarray, total: int, eos_id: int,
                   dtype: np.dtype) -> np.ndarray:
    out = np.full(total, eos_id, dtype=dtype)
    mask = np.ones(total, dtype=bool)
    mask[np.cumsum(lengths) - 1] = False  # the EOS slot after each document
    if total:
        out[mask] = np.concatenate([np.asarray(d, dtype=dtype) for d in docs])
    return out


def pack_sft(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, eos_id: int,
             dtype: np.dtype = np.int32) -> tuple[Blocks, int]:
    """One block per (prompt ids, response ids) example; returns (blocks, examples dropped as too long)."""
    kept = [(p, r) for p, r in examples if len(p) + len(r) + 1 <= seq_len and len(r) > 0]
    tokens = np.full((len(kept), seq_len), eos_id, dtype=dtype)
    response_mask = np.zeros((len(kept), seq_len), dtype=np.uint8)
    for i, (p, r) in enumerate(kept):
        tokens[i, :len(p)] = p
        tokens[i, len(p):len(p) + len(r)] = r
        response_mask[i, len(p):] = 1
    blocks = Blocks(tokens, np.full(len(kept), seq_len, np.int32), [np.zeros(1, np.int32)] * len(kept),
                    response_mask)
    return blocks, len(examples) - len(kept)
