"""One training step (forward + backward) of the MLFM objective vs the same network as a plain MDM, on CPU.

    python benchmarks/model_step.py [--presets tiny small-20m] [--steps 10] [--out benchmarks/results/model.json]

For each preset, in one run on this machine:
  - step time, MLFM (bridge corruption, γ conditioning) vs MDM (ids in, z = m on masked positions, CE), the
    same model alternating between the two in one process: the MLFM overhead as a ratio of medians;
  - model FLOP/s (``flops_per_token`` × tokens / step time) as a fraction of a measured fp32 GEMM FLOP/s;
  - peak resident memory of a step with activation recompute off and on (each in a fresh process).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def gemm_flops(n: int = 2048, reps: int = 10) -> float:
    """Best fp32 matmul FLOP/s of an n×n×n product over ``reps`` tries (after warm-up)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def one(preset: str, recompute: bool, steps: int) -> dict:
    """Build the preset's model once and time ``steps`` steps of each objective kind, alternating MLFM and MDM
    steps so both see the same machine state; runs inside its own process (for its peak RSS)."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from mlfm_scale.config import load_config
    from mlfm_scale.data.batch import MicroBatch
    from mlfm_scale.model.mlfm import MLFMModel
    from mlfm_scale.parallel.state import init_model_parallel
    from mlfm_scale.train.objective import MLFMObjective

    cfg = load_config(REPO / "configs" / f"{preset}.yaml", [f"model.recompute={recompute}",
                                                            "objective.crop_probability=0"])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29611", rank=0, world_size=1)
    init_model_parallel(cfg.parallel.model_copy(update={"tp": 1, "pp": 1}), cfg.seed)
    vocab = cfg.model.vocab_size or cfg.data.prep.vocab_size
    model = MLFMModel(cfg.model, vocab, seed=0)
    objectives = {kind: MLFMObjective(cfg.objective.model_copy(update={"kind": kind}), mask_id=2, special_ids=(0, 1))
                  for kind in ("mlfm", "mdm")}
    g = torch.Generator().manual_seed(0)
    b, s = cfg.train.micro_batch_size, cfg.data.seq_len
    batch = MicroBatch(torch.randint(3, vocab, (b, s), generator=g), torch.full((b,), s))
    times = {kind: [] for kind in objectives}
    for i in range(steps + 2):
        for kind, objective in objectives.items():
            start = time.perf_counter()
            loss, _ = objective(model, batch, g)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if i >= 2:  # two warm-up rounds
                times[kind].append(time.perf_counter() - start)
    return {"mlfm_step_s": statistics.median(times["mlfm"]), "mdm_step_s": statistics.median(times["mdm"]),
            "tokens": b * s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(preset: str, recompute: bool, steps: int) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.model_step import one; " \
           f"print(json.dumps(one({preset!r}, {recompute}, {steps})))"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode:
        raise SystemExit(f"{preset}/recompute={recompute} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small-20m"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "model.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from mlfm_scale.config import load_config
    from mlfm_scale.model.flops import flops_per_token, parameter_count

    peak = gemm_flops()
    print(f"fp32 GEMM (2048³): {peak / 1e9:.1f} GFLOP/s")
    report = {"gemm_flops": peak, "presets": {}}
    for preset in args.presets:
        cfg = load_config(REPO / "configs" / f"{preset}.yaml")
        vocab = cfg.model.vocab_size or cfg.data.prep.vocab_size
        plain = measure(preset, False, args.steps)
        recompute = measure(preset, True, args.steps)
        flops = flops_per_token(cfg.model, vocab, cfg.data.seq_len, posterior_mean=False) * plain["tokens"]
        row = {
            "params_m": parameter_count(cfg.model, vocab) / 1e6,
            "mlfm_step_s": plain["mlfm_step_s"], "mdm_step_s": plain["mdm_step_s"],
            "mlfm_over_mdm": plain["mlfm_step_s"] / plain["mdm_step_s"],
            "model_gflops": flops / plain["mlfm_step_s"] / 1e9, "fraction_of_gemm": flops / plain["mlfm_step_s"] / peak,
            "peak_rss_mb": plain["peak_rss_mb"], "peak_rss_recompute_mb": recompute["peak_rss_mb"],
            "recompute_step_s": recompute["mlfm_step_s"],
        }
        report["presets"][preset] = row
        print(f"{preset:<10} {row['params_m']:6.1f}M params  MLFM {row['mlfm_step_s'] * 1e3:7.1f} ms  "
              f"MDM {row['mdm_step_s'] * 1e3:7.1f} ms  ratio {row['mlfm_over_mdm']:.3f}  "
              f"{row['model_gflops']:.1f} GFLOP/s = {row['fraction_of_gemm']:.1%} of GEMM  "
              f"peak RSS {row['peak_rss_mb']:.0f} MB → {row['peak_rss_recompute_mb']:.0f} MB with recompute "
              f"({row['recompute_step_s'] * 1e3:.1f} ms)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
