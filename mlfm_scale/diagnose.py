"""``mlfm diagnose EXPORT_DIR --data PREPARED_DIR``: where an exported model decides its tokens.

Corrupts every position of validation blocks at each γ of a grid, measures token accuracy and cross-entropy
(MLFM.md, "Noise geometry"), and reads the decision window off the accuracy profile (``flow/decision.py``).
It prints the profile and window, records both in the export's ``config.json`` (``decision``; written to a
temporary file, then renamed) so ``sample.gamma_min=auto`` can use them, and plots ``decision.png`` there:
accuracy and CE against γ beside the training γ density and the sampling grid (``train.metrics.plot_gamma``).

Training runs measure the same profile through their engine at every evaluation (``train/loop.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mlfm_scale.errors import UserError
from mlfm_scale.flow.bridge import bridge_forward
from mlfm_scale.flow.decision import decision_record, window_of
from mlfm_scale.flow.objective import per_position_ce
from mlfm_scale.flow.schedules import bridge_time


@torch.no_grad()
def decision_profile(denoiser, ids: Tensor, valid: Tensor, gammas: Tensor, generator: torch.Generator,
                     segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(accuracy [K], CE [K] in nats) of ``denoiser`` (a sampler Denoiser) on blocks ``ids`` Long[b, s] with every
    ``valid`` (Bool[b, s]) position corrupted by the forward process at each γ of ``gammas`` [K]; means over the
    valid positions, float64."""
    e, m = denoiser.embed(ids), denoiser.mask_embedding()
    accuracy, ce = [], []
    for gamma in gammas.tolist():
        t = bridge_time(torch.tensor(gamma, dtype=torch.float64), denoiser.sigma)
        z = bridge_forward(e, m, t, valid, denoiser.sigma, generator)
        logits = denoiser(z, torch.full((ids.size(0),), gamma, device=z.device), segment_ids)
        chosen = valid.float()
        accuracy.append(float(((logits.argmax(-1) == ids).float() * chosen).sum() / chosen.sum()))
        ce.append(float((per_position_ce(logits, ids) * chosen).sum() / chosen.sum()))
    return torch.tensor(accuracy, dtype=torch.float64), torch.tensor(ce, dtype=torch.float64)


def validation_blocks(data_dir: Path, count: int) -> tuple[Tensor, Tensor]:
    """The first ``count`` blocks of ``data_dir``'s validation split (train when there is none): ids Long[b, s]
    and their real lengths Long[b]. Compressed shards are read through a temporary decompressed copy of the ones
    needed, so the prepared directory is never written to."""
    from streaming import LocalDataset
    from streaming.base.compression import decompress

    split = next((data_dir / s for s in ("val", "train") if (data_dir / s / "index.json").is_file()), None)
    if split is None:
        raise UserError(f"{data_dir} holds no prepared shards (no val/index.json or train/index.json): "
                        "point --data at a directory written by `mlfm prep corpus`")
    index = json.loads((split / "index.json").read_text())
    shards, total = [], 0
    for shard in index["shards"]:  # only as many shards as the blocks asked for
        shards.append(shard)
        total += shard["samples"]
        if total >= count:
            break
    with tempfile.TemporaryDirectory() as tmp:
        for shard in shards:
            raw, target = split / shard["raw_data"]["basename"], Path(tmp) / shard["raw_data"]["basename"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if raw.is_file():
                shutil.copyfile(raw, target)
            else:
                packed = (split / shard["zip_data"]["basename"]).read_bytes()
                target.write_bytes(decompress(shard["compression"], packed))
        (Path(tmp) / "index.json").write_text(json.dumps(dict(index, shards=shards)))
        dataset = LocalDataset(local=tmp)
        samples = [dataset[i] for i in range(min(count, len(dataset)))]
    ids = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    return ids, torch.tensor([int(s["length"]) for s in samples], dtype=torch.long)


def diagnose_export(export_dir: Path, data_dir: Path, blocks: int = 16, points: int = 17, seed: int = 0) -> dict:
    """Measure an export's decision profile on ``blocks`` prepared blocks at ``points`` γ values spanning the
    training range, record it in its config.json and plot decision.png; returns the record."""
    from mlfm_scale.config import SampleSection
    from mlfm_scale.data.loader import segment_ids
    from mlfm_scale.inference import MLFMForInference
    from mlfm_scale.sample.grid import gamma_grid, sampling_range
    from mlfm_scale.train.metrics import plot_gamma

    model = MLFMForInference.from_pretrained(export_dir)
    ids, lengths = validation_blocks(data_dir, blocks)
    if ids.size(1) != model.seq_len:
        raise UserError(f"{data_dir} holds blocks of {ids.size(1)} tokens, the model was trained on {model.seq_len}")
    special = torch.tensor([model.mask_id, model.eos_id, model.pad_id])
    valid = (torch.arange(ids.size(1))[None] < lengths[:, None]) & ~torch.isin(ids, special)
    objective = model.objective_cfg
    gammas = torch.linspace(objective.gamma_min, objective.gamma_max, points, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    padding = segment_ids(ids, lengths, None)  # a block's padded tail is its own segment, as in training
    accuracy, ce = decision_profile(model, ids, valid, gammas, generator, padding)
    record = decision_record(gammas, accuracy, ce)
    config_path = export_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["decision"] = record
    temporary = config_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(config, indent=1))
    os.replace(temporary, config_path)
    schedule = model.gamma_schedule()
    dens_grid = torch.linspace(objective.gamma_min, objective.gamma_max, 200, dtype=torch.float64)
    sample = SampleSection.model_validate(model.generation_config or {})
    grid = gamma_grid(schedule, sample.steps, *sampling_range(sample, window_of(record), schedule)[:2], sample.grid)
    plot_gamma(export_dir / "decision.png", (dens_grid.numpy(), schedule.pdf(dens_grid).numpy()), decision=record,
               grid=grid, title=f"{export_dir.name}: where the model decides")
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export", help="export directory written by `mlfm export`")
    parser.add_argument("--data", required=True, help="prepared shards (a directory written by `mlfm prep corpus`)")
    parser.add_argument("--blocks", type=int, default=16, help="validation blocks to corrupt (default: %(default)s)")
    parser.add_argument("--points", type=int, default=17, help="γ values over the training range (default: "
                        "%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corruption noise (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    export = Path(args.export)
    if not (export / "config.json").is_file():
        raise UserError(f"no exported model at {export} (config.json missing): run `mlfm export CHECKPOINT {export}`")
    if args.blocks < 1 or args.points < 2:
        raise UserError(f"--blocks must be ≥ 1 and --points ≥ 2, got {args.blocks} and {args.points}")
    record = diagnose_export(export, Path(args.data), args.blocks, args.points, args.seed)
    print(f"{'γ':>7} {'accuracy':>9} {'CE':>7}")
    for g, a, c in zip(record["gamma"], record["accuracy"], record["ce"]):
        print(f"{g:>7.2f} {a:>9.3f} {c:>7.3f}")
    w = record["window"]
    print("decision window: none on this grid" if w is None else
          f"decision window: γ ∈ [{w['low']:.2f}, {w['high']:.2f}], middle {w['mid']:.2f}")
    print(f"recorded in {export / 'config.json'}; plot {export / 'decision.png'}")
    return 0
