"""Bookkeeping shared by every sampler: which positions are still to fill, the tokens so far, NFE and rounds
per sample, the optional promotion history, the EOS stop and the progress bar."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mlfm_scale.sample.canvas import Canvas


@dataclass
class SampleOutput:
    """ids Long[b, s]: prompt + filled positions (+ pad); generated: per sample the filled tokens in order, cut
    before the first EOS when sampling stopped at it; nfe, rounds Long[b]: network evaluations and decision
    rounds per sample; history: per sample a list of rounds ``{"round", "nfe", "positions", "tokens",
    "scores"}`` (positions index the row), or None when not recorded; gamma_min: the γ where the trajectories
    ended and gamma_min_source what it came from (``config``, ``decision_window``, ``gamma_law_median``)."""

    ids: Tensor
    generated: list[list[int]]
    nfe: Tensor
    rounds: Tensor
    history: list[list[dict]] | None
    gamma_min: float
    gamma_min_source: str


class SampleState:
    """The samples being drawn: ids Long[b, s] (on the model's device), remaining Bool[b, s] (positions still to
    decide), nfe and rounds Long[b] (CPU). Samplers decide positions only through :meth:`commit`."""

    def __init__(self, canvas: Canvas, eos_id: int, stop_at_eos: bool, history: bool = False,
                 progress: bool = False):
        self.canvas, self.eos_id, self.stop_at_eos = canvas, eos_id, stop_at_eos
        self.ids = canvas.ids.clone()
        self.remaining = canvas.fill.clone()
        b = canvas.ids.size(0)
        self.nfe = torch.zeros(b, dtype=torch.long)
        self.rounds = torch.zeros(b, dtype=torch.long)
        self.history: list[list[dict]] | None = [[] for _ in range(b)] if history else None
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=int(canvas.fill.sum()), unit="token", desc="sampling", leave=False)

    def active(self) -> Tensor:
        """Long[a]: the rows with positions left to fill."""
        return self.remaining.any(dim=1).nonzero().flatten()

    def commit(self, rows: Tensor, chosen: Tensor, tokens: Tensor, nfe: int | Tensor, scores: Tensor) -> None:
        """Write ``tokens`` (Long[a, s]) at the ``chosen`` remaining positions (Bool[a, s]) of ``rows`` (Long[a]),
        which spent ``nfe`` evaluations (each the same, or Long[a] per row) on this round; ``scores`` [a, s] go to
        the history."""
        before = int(self.remaining.sum())
        chosen = chosen & self.remaining[rows]
        self.ids[rows] = torch.where(chosen, tokens, self.ids[rows])
        self.remaining[rows] &= ~chosen
        cpu_rows = rows.cpu()
        self.nfe[cpu_rows] += torch.as_tensor(nfe, dtype=torch.long).cpu()
        self.rounds[cpu_rows] += 1
        if self.history is not None:
            for i, row in enumerate(cpu_rows.tolist()):
                where = chosen[i].nonzero().flatten()
                self.history[row].append({"round": int(self.rounds[row]), "nfe": int(self.nfe[row]),
                                          "positions": where.tolist(), "tokens": tokens[i, where].tolist(),
                                          "scores": scores[i, where].float().tolist()})
        if self.stop_at_eos:
            self._stop_after_eos(rows)
        if self.bar is not None:
            self.bar.update(before - int(self.remaining.sum()))

    def _stop_after_eos(self, rows: Tensor) -> None:
        """Fill every position after a row's first decided EOS with EOS and close it."""
        fill = self.canvas.fill[rows]
        decided_eos = fill & ~self.remaining[rows] & (self.ids[rows] == self.eos_id)
        positions = torch.arange(fill.size(1), device=fill.device).expand_as(fill)
        first = torch.where(decided_eos, positions, fill.size(1)).min(dim=1, keepdim=True).values
        after = fill & (positions > first)
        self.ids[rows] = torch.where(after, self.eos_id, self.ids[rows])
        self.remaining[rows] &= ~after

    def output(self, gamma_min: float, gamma_min_source: str) -> SampleOutput:
        if self.bar is not None:
            self.bar.close()
        generated = []
        for row, fill in zip(self.ids.cpu(), self.canvas.fill.cpu()):
            tokens = row[fill].tolist()
            if self.stop_at_eos and self.eos_id in tokens:
                tokens = tokens[: tokens.index(self.eos_id)]
            generated.append(tokens)
        return SampleOutput(self.ids, generated, self.nfe, self.rounds, self.history, gamma_min, gamma_min_source)
