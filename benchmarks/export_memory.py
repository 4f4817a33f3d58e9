"""Peak memory of ``mlfm export`` against the size of the model it writes, on a real sharded checkpoint.

    python benchmarks/export_memory.py [--preset small-20m] [--out benchmarks/results/export_memory.json]

Trains the preset for one step (2 processes: ZeRO-3 × DP=2, and TP=2 × ZeRO-3), then exports the checkpoint in
a fresh process: the export's peak RSS minus the RSS once everything is imported (torch, DeepSpeed, safetensors),
as a multiple of the fp32 model and of the largest checkpoint file. The target: about one model copy plus one
shard, i.e. (peak − baseline) ≈ model + largest file, not several model copies.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import REPO, prepare, train  # noqa: E402

MEASURE = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import deepspeed, safetensors.torch  # noqa: F401  (what the export imports, before the baseline is taken)
from mlfm_scale.export import export
rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
baseline = rss()
summary = export(Path({tag!r}), Path({out!r}), weights="raw")
print(json.dumps({{"baseline_rss_bytes": baseline, **{{k: v for k, v in summary.items() if k != "files"}}}}))
"""


def measure(tag: Path, out: Path) -> dict:
    code = MEASURE.format(repo=str(REPO), tag=str(tag), out=str(out))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    row = json.loads(result.stdout.strip().splitlines()[-1])
    largest = max(p.stat().st_size for p in tag.iterdir() if p.is_file())
    grown = row["peak_rss_bytes"] - row["baseline_rss_bytes"]
    return {**row, "largest_file_bytes": largest, "peak_minus_baseline_bytes": grown,
            "growth_over_model": grown / row["fp32_model_bytes"],
            "growth_over_model_plus_largest_file": grown / (row["fp32_model_bytes"] + largest)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-20m")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "export_memory.json"))
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(args.preset, work)
        for layout, extra in (("zero3-dp2", ()), ("zero3-tp2", ("parallel.tp=2",))):
            train(args.preset, 2, work / layout, data, 1, *extra)
            rows[layout] = measure(work / layout / "checkpoints" / "step00000001", work / f"{layout}-export")
    print(f"{'layout':<10} {'model MiB':>10} {'largest file MiB':>17} {'peak − baseline MiB':>20} "
          f"{'÷ model':>8} {'÷ (model + file)':>17}")
    for layout, r in rows.items():
        print(f"{layout:<10} {r['fp32_model_bytes'] / 2**20:>10.1f} {r['largest_file_bytes'] / 2**20:>17.1f} "
              f"{r['peak_minus_baseline_bytes'] / 2**20:>20.1f} {r['growth_over_model']:>8.2f} "
              f"{r['growth_over_model_plus_largest_file']:>17.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"preset": args.preset, "layouts": rows}, indent=1))


if __name__ == "__main__":
    main()
