"""Per-piece initialisation seeds: every piece of the network (embedding, γ embedding, each layer, output
layer) draws its initial weights from a seed of its own, derived from (seed, piece name). The weights then do
not depend on which process builds the piece: a pipeline stage holding layers 5–8 builds exactly the layers
5–8 of the one-stage model, and every tensor-parallel size slices the same full weights (megatron's CPU
initialisation draws the full matrix from the torch RNG, then keeps this rank's slice)."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def piece_seed(seed: int, piece: str) -> int:
    """A 63-bit seed for ``piece`` of a model initialised with ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{piece}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded(seed: int, piece: str) -> Iterator[None]:
    """Build ``piece`` from its own seed; the global CPU RNG is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(piece_seed(seed, piece))
        yield
