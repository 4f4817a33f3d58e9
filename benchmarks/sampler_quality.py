"""Sample quality against cost on the synthetic corpus: MLFM promotion, pure flow and MDM decoding of one model.

    python benchmarks/sampler_quality.py [--samples 16] [--steps 1 2 4 8 32 256] [--out benchmarks/results/...]

Trains the tiny MLFM (configs/tiny.yaml, 2-process ZeRO-3 on CPU) once on the synthetic corpus and exports its
EMA weights; both are cached under build/sampler_quality/ (delete it to retrain). Then for each sampler and
step count it draws ``--samples`` prompted samples (``Story of NAME.`` + 48 tokens) with one seed and scores
them with the corpus checker (``data_prep.synth``): validity rate against the mean NFE per sample. Writes
benchmarks/results/sampler_quality.json and a PNG plot of validity vs NFE, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "sampler_quality"
TRAIN_STEPS = 1600
sys.path.insert(0, str(REPO))


def run(*args: str) -> None:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def trained_checkpoint() -> Path:
    """The tiny MLFM trained on the synthetic corpus (cached): its latest checkpoint directory."""
    from data_prep.shards import prepare_shards
    from data_prep.synth import write_synth_jsonl
    from mlfm_scale.config import load_config

    run_dir = CACHE / "run"
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file() and (run_dir / "checkpoints" / latest.read_text().strip()).is_dir():
        return run_dir / "checkpoints" / latest.read_text().strip()
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    write_synth_jsonl(CACHE / "corpus.jsonl", cfg.data.synth.documents, cfg.data.synth.seed)
    prepare_shards([CACHE / "corpus.jsonl"], CACHE / "data", cfg.data.prep, cfg.data.seq_len, overwrite=True,
                   progress=False)
    started = time.perf_counter()
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mlfm_scale.cli", "train",
        "configs/tiny.yaml", f"out_dir={run_dir}", f"data.root={CACHE / 'data'}", f"train.steps={TRAIN_STEPS}",
        f"checkpoint.every={TRAIN_STEPS}", "log.every=100", "train.eval_every=400", "log.plot_every=400",
        "sample.validation.every=400")
    print(f"trained {TRAIN_STEPS} steps in {time.perf_counter() - started:.0f} s → {run_dir}")
    return run_dir / "checkpoints" / latest.read_text().strip()
