"""Seeds keyed by what a result depends on: (seed, step, micro-batch, data-parallel rank) for a training step's
draws, (seed, prompt index) for a sample's, never the batch or the rank a prompt lands on."""
from __future__ import annotations

import hashlib


def keyed_seed(*key: int) -> int:
    """A 63-bit seed from the blake2b digest of ``key``'s parts joined by ':'."""
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index``'s draws in a run seeded ``seed``, whatever batch or rank it lands in."""
    return keyed_seed(seed, index)
