"""An exponential moving average of the trained weights, held the way the weights are held.

Under ZeRO-3 each rank keeps the EMA of its own partition (``param.ds_tensor``), updated after each optimizer
step; otherwise the EMA of the whole local (TP-sliced) parameter. ``swapped()`` puts the EMA into the model
for evaluation or export and restores the weights afterwards; ``release`` (ZeRO-3: partition every parameter)
runs around the swap so no gathered copy of the raw weights outlives it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _local(p: nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    def __init__(self, model: nn.Module, decay: float, release: Callable[[], None] | None = None):
        self.decay, self.release = decay, release or (lambda: None)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params}

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the current weights (after they were loaded)."""
        for n, p in self.params:
            self.shadow[n].copy_(_local(p).detach().float())

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params:
            self.shadow[n].lerp_(_local(p).detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mismatched = [n for n, t in self.shadow.items() if n not in state or state[n].shape != t.shape]
        if mismatched:
            raise ValueError(f"EMA state does not match this layout's partitions: {mismatched[:3]} ...")
        self.shadow = {n: state[n].to(self.shadow[n].device, copy=True) for n in self.shadow}

    @contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        self.release()
        backup = {n: _local(p).detach().clone() for n, p in self.params}
        for n, p in self.params:
            _local(p).copy_(self.shadow[n])
        try:
            yield
        finally:
            self.release()
            for n, p in self.params:
                _local(p).copy_(backup[n])
