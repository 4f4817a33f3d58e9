"""Training throughput and engine overhead on this machine (CPU, gloo), as ratios in one run.

    python benchmarks/train_throughput.py [--presets tiny small-20m] [--out benchmarks/results/train.json]

Prepares a small synthetic shard set per preset, then for each preset:
  - ``mlfm train`` at 1 and 2 processes (ZeRO-3, tp = 1): tokens/s, MFU (vs measured GEMM peak), per-rank
    resident parameter + optimizer bytes, checkpoint save seconds and bytes, and resume (load) seconds;
  - a plain single-process PyTorch step (same model, objective and AdamW, no DeepSpeed) on the same global
    batch: the engine's overhead is the 2-process ZeRO-3 step time over the plain step time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = {"tiny": 20, "small-20m": 6}


def prepare(preset: str, work: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from data_prep.shards import prepare_shards
    from data_prep.synth import write_synth_jsonl
    from mlfm_scale.config import load_config

    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    write_synth_jsonl(work / "corpus.jsonl", 6000, seed=0)
    prepare_shards([work / "corpus.jsonl"], work / "data", cfg.data.prep.model_copy(update={"val_fraction": 0.0}),
                   cfg.data.seq_len, progress=False)
    return work / "data"


def train(preset: str, nproc: int, out: Path, data: Path, steps: int, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "mlfm_scale.cli", "train", f"configs/{preset}.yaml", f"out_dir={out}", f"data.root={data}",
           f"train.steps={steps}", "log.every=1", f"checkpoint.every={steps}", "train.eval_every=100000",
           "log.plot_every=100000", "objective.crop_probability=0", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def plain_step_seconds(preset: str, batch: int, steps: int) -> float:
    """Median seconds of a single-process PyTorch step: objective forward + backward + AdamW, no DeepSpeed."""
    code = f"""
import sys, time, statistics, torch, torch.distributed as dist
sys.path.insert(0, {str(REPO)!r})
from mlfm_scale.config import load_config
from mlfm_scale.data.batch import MicroBatch
from mlfm_scale.model.mlfm import MLFMModel
from mlfm_scale.parallel.state import init_model_parallel
from mlfm_scale.train.engine import param_groups
from mlfm_scale.train.objective import MLFMObjective
cfg = load_config({str(REPO / "configs" / f"{preset}.yaml")!r}, ["objective.crop_probability=0"])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29623", rank=0, world_size=1)
init_model_parallel(cfg.parallel.model_copy(update={{"tp": 1}}), 0)
vocab = cfg.data.prep.vocab_size
model = MLFMModel(cfg.model, vocab, seed=0)
objective = MLFMObjective(cfg.objective, 2, (0, 1))
opt = torch.optim.AdamW(param_groups(model, cfg), lr=1e-4)
g = torch.Generator().manual_seed(0)
b, s = {batch}, cfg.data.seq_len
times = []
for i in range({steps} + 2):
    mb = MicroBatch(torch.randint(3, vocab, (b, s), generator=g), torch.full((b,), s))
    start = time.perf_counter()
    loss, _ = objective(model, mb, g)
    opt.zero_grad(); loss.backward(); opt.step()
    times.append(time.perf_counter() - start)
print(statistics.median(times[2:]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small-20m"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from mlfm_scale.config import load_config

    report = {}
    for preset in args.presets:
        work = Path(tempfile.mkdtemp(prefix=f"mlfm-train-bench-{preset}-"))
        data = prepare(preset, work)
        steps = STEPS.get(preset, 10)
        micro = load_config(REPO / "configs" / f"{preset}.yaml").train.micro_batch_size
        row = {}
        for nproc in (1, 2):
            out = work / f"run{nproc}"
            rows = train(preset, nproc, out, data, steps)
            losses = [r for r in rows if "step_s" in r and r["step"] > 2]
            saved = next(r for r in rows if "checkpoint_s" in r)
            resident = next(r for r in rows if "resident_param_bytes" in r)
            started = time.perf_counter()
            resumed = next(r for r in train(preset, nproc, out, data, steps + 1, "train.resume=auto")
                           if "resume_s" in r)
            row[f"dp{nproc}"] = {
                "step_s": statistics.median(r["step_s"] for r in losses),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in losses),
                "mfu": statistics.median(r["mfu"] for r in losses),
                "resident_param_mb": resident["resident_param_bytes"] / 2**20,
                "resident_optimizer_mb": resident["resident_optimizer_bytes"] / 2**20,
                "checkpoint_mb": saved["checkpoint_bytes"] / 2**20, "save_s": saved["checkpoint_s"],
                "load_s": resumed["resume_s"], "resume_run_s": time.perf_counter() - started,
            }
        plain = plain_step_seconds(preset, 2 * micro, steps)
        row["plain_step_s_global_batch"] = plain
        row["zero3_dp2_over_plain"] = row["dp2"]["step_s"] / plain
        row["resident_dp2_over_dp1"] = ((row["dp2"]["resident_param_mb"] + row["dp2"]["resident_optimizer_mb"])
                                        / (row["dp1"]["resident_param_mb"] + row["dp1"]["resident_optimizer_mb"]))
        report[preset] = row
        for dp in ("dp1", "dp2"):
            r = row[dp]
            print(f"{preset:<10} {dp}: {r['tokens_per_s']:>8.0f} tok/s  MFU {r['mfu']:.1%}  step {r['step_s']:.3f} s  "
                  f"resident params {r['resident_param_mb']:.1f} MB + optimizer {r['resident_optimizer_mb']:.1f} MB"
                  f"  checkpoint {r['checkpoint_mb']:.1f} MB: save {r['save_s']:.2f} s, load {r['load_s']:.2f} s")
        print(f"{preset:<10} plain PyTorch step on the global batch {plain:.3f} s; ZeRO-3 2-process / plain = "
              f"{row['zero3_dp2_over_plain']:.2f}; resident memory DP=2 / DP=1 = {row['resident_dp2_over_dp1']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
