"""Evaluation throughput of the demo model on this machine's CPU: prompts/s and NFE/s with one rank and two.

    python benchmarks/eval_throughput.py [--model runs/demo/export] [--limit 32] [--steps 8] [--batch-size 8]

Runs `mlfm eval validity` (unconditional and prompted samples scored by the corpus checker) on 1 rank and on 2
(`--nproc 2`) with the same settings; throughput is the task's own measure (the generation's wall time on rank 0,
gather included), so process start-up is left out. Both runs' samples must be identical (per-prompt seeds), and
the script says so. Writes benchmarks/results/eval_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def evaluate(model: Path, out: Path, ranks: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "mlfm_scale.cli", "eval", "validity", "--model", str(model), "--out", str(out),
               "--limit", str(args.limit), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               *(["--nproc", str(ranks)] if ranks > 1 else [])]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads((out / f"steps{args.steps}" / "validity" / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "runs" / "demo" / "export"), help="an export (`make demo`)")
    parser.add_argument("--limit", type=int, default=32, help="unconditional samples, and as many prompted")
    parser.add_argument("--steps", type=int, default=8, help="SDE steps per promotion round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_throughput.json"))
    args = parser.parse_args()
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise SystemExit(f"no export at {model}: run `make demo` first (or pass --model)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (1, 2):
            metrics = evaluate(model, Path(tmp) / f"r{ranks}", ranks, args)
            rows.append({"ranks": ranks, **{k: metrics[k] for k in ("n", "nfe", "seconds", "prompts_per_s",
                                                                   "nfe_per_s", "valid_rate")},
                         "samples": [s["text"] for s in metrics["samples"]]})
    same = rows[0].pop("samples") == rows[1].pop("samples")
    print(f"{'ranks':>5} {'prompts':>7} {'NFE/prompt':>10} {'seconds':>8} {'prompts/s':>9} {'NFE/s':>8}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['n']:>7} {r['nfe']:>10.1f} {r['seconds']:>8.1f} {r['prompts_per_s']:>9.2f} "
              f"{r['nfe_per_s']:>8.1f}")
    speedup = rows[1]["prompts_per_s"] / rows[0]["prompts_per_s"]
    print(f"2 ranks / 1 rank: {speedup:.2f}× prompts/s; samples identical: {same}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows, "speedup_2_ranks": speedup,
                                          "identical_samples": same}, indent=1))


if __name__ == "__main__":
    main()
