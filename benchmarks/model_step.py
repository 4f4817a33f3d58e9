"""One training step (forward + backward) of the MLFM objective vs the same network as a plain MDM, on CPU.

    python benchmarks/model_step.py [--presets tiny small-20m] [--steps 10] [--out benchmarks/results/model.json]

For each preset, in one run on this machine:
  - step time, MLFM (bridge corruption, γ conditioning) vs MDM (ids in, z = m on masked positions, CE):
    the MLFM overhead as a ratio;
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


def gemm_flops(n: int = 1024, reps: int = 20) -> float:
    """Best fp32 matmul FLOP/s of an n×n×n product over ``reps`` tries."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def one(preset: str, kind: str, recompute: bool, steps: int) -> dict:
    """Build the preset's model and time ``steps`` objective steps; runs inside its own process."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from mlfm_scale.config import load_config
    from mlfm_scale.data.batch import MicroBatch
    from mlfm_scale.model.mlfm import MLFMModel
    from mlfm_scale.parallel.state import init_model_parallel
    from mlfm_scale.train.objective import MLFMObjective

    cfg = load_config(REPO / "configs" / f"{preset}.yaml", [f"model.recompute={recompute}", f"objective.kind={kind}",
                                                            "objective.crop_probability=0"])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29611", rank=0, world_size=1)
    init_model_parallel(cfg.parallel.model_copy(update={"tp": 1, "pp": 1}), cfg.seed)
    vocab = cfg.model.vocab_size or cfg.data.prep.vocab_size
    torch.manual_seed(0)
    model = MLFMModel(cfg.model, vocab)
    objective = MLFMObjective(cfg.objective, mask_id=2, special_ids=(0, 1))
    g = torch.Generator().manual_seed(0)
    b, s = cfg.train.micro_batch_size, cfg.data.seq_len
    batch = MicroBatch(torch.randint(3, vocab, (b, s), generator=g), torch.full((b,), s))
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        loss, _ = objective(model, batch, g)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "tokens": b * s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(preset: str, kind: str, recompute: bool, steps: int) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.model_step import one; " \
           f"print(json.dumps(one({preset!r}, {kind!r}, {recompute}, {steps})))"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode:
        raise SystemExit(f"{preset}/{kind}/recompute={recompute} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small-20m"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "model.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from mlfm_scale.config import load_config
    from mlfm_scale.model.flops import flops_per_token, parameter_count

    peak = gemm_flops()
    print(f"fp32 GEMM (1024³): {peak / 1e9:.1f} GFLOP/s")
    report = {"gemm_flops": peak, "presets": {}}
    for preset in args.presets:
        cfg = load_config(REPO / "configs" / f"{preset}.yaml")
        vocab = cfg.model.vocab_size or cfg.data.prep.vocab_size
        mlfm = measure(preset, "mlfm", False, args.steps)
        mdm = measure(preset, "mdm", False, args.steps)
        recompute = measure(preset, "mlfm", True, args.steps)
        flops = flops_per_token(cfg.model, vocab, cfg.data.seq_len, posterior_mean=False) * mlfm["tokens"]
        row = {
            "params_m": parameter_count(cfg.model, vocab) / 1e6,
            "mlfm_step_s": mlfm["step_s"], "mdm_step_s": mdm["step_s"],
            "mlfm_over_mdm": mlfm["step_s"] / mdm["step_s"],
            "model_gflops": flops / mlfm["step_s"] / 1e9, "fraction_of_gemm": flops / mlfm["step_s"] / peak,
            "peak_rss_mb": mlfm["peak_rss_mb"], "peak_rss_recompute_mb": recompute["peak_rss_mb"],
            "recompute_step_s": recompute["step_s"],
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
