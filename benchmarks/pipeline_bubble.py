"""Pipeline step time and bubble on this machine (CPU, gloo, one thread per process), as ratios in one run.

    python benchmarks/pipeline_bubble.py [--preset small-20m] [--micro 1 4 8] [--out benchmarks/results/pipeline.json]

For each number of micro-batches m per step (``train.grad_accum``, micro-batch 2 × seq_len tokens, ZeRO-1):
  - PP = 1 on one process: T1(m), the whole model's work for the step;
  - PP = 2 on two processes: T2(m). Split perfectly and without a bubble it would take T1(m) / 2, so the
    measured idle fraction is 1 − T1(m) / (2 · T2(m)) (schedule bubble + stage imbalance + p2p cost);
  - DeepSpeed's 1F1B schedule idles (p − 1) / (m + p − 1) of a step: 1 / (m + 1) for p = 2.
Step times are medians over the steps after the first two.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import prepare, train  # noqa: E402

STEPS = 6


def step_seconds(rows: list[dict]) -> float:
    return statistics.median(r["step_s"] for r in rows if "step_s" in r and r["step"] > 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small-20m")
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pipeline.json"))
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # one core per process for every run (torchrun sets it for nproc > 1 only)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(args.preset, work)
        for m in args.micro:
            common = ("parallel.zero_stage=1", f"train.grad_accum={m}", "train.micro_batch_size=2")
            one = step_seconds(train(args.preset, 1, work / f"pp1-{m}", data, STEPS, *common))
            two = step_seconds(train(args.preset, 2, work / f"pp2-{m}", data, STEPS, *common, "parallel.pp=2"))
            rows.append({"micro_batches": m, "pp1_step_s": one, "pp2_step_s": two, "speedup": one / two,
                         "bubble_expected": 1 / (m + 1), "idle_measured": 1 - one / (2 * two)})
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print("\n| micro-batches | PP=1 (1 proc) s/step | PP=2 (2 procs) s/step | speed-up | bubble 1/(m+1) | "
          "idle measured |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['micro_batches']} | {r['pp1_step_s']:.3f} | {r['pp2_step_s']:.3f} | {r['speedup']:.2f}× | "
              f"{r['bubble_expected']:.2f} | {r['idle_measured']:.2f} |")


if __name__ == "__main__":
    main()
