"""Sample quality against cost on the synthetic corpus: MLFM promotion, pure flow and MDM decoding of one model.

    python benchmarks/sampler_quality.py [--samples 16] [--steps 1 2 4 8 32 256] [--out benchmarks/results/...]

Trains a small MLFM (configs/tiny.yaml made 4 layers × d128, 2-process ZeRO-3 on CPU) once on the synthetic
corpus and exports its EMA weights; both are cached under build/sampler_quality/ (delete it to retrain). Then for
each sampler and step count it draws ``--samples`` unconditional and as many prompted samples (``Story of NAME.``)
of ``--length`` tokens with one seed and scores the sentences they wrote with the corpus checker
(``data_prep.synth``): the share of valid samples and of valid sentences against the mean NFE per sample. Writes
benchmarks/results/sampler_quality.json, the plot benchmarks/figures/sampler_quality.png (validity vs NFE) and
prints the table.
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
TRAIN_STEPS = 3000
MODEL = ["model.num_layers=4", "model.hidden_size=128", "model.ffn_hidden_size=352"]  # tiny.yaml, 4× wider/deeper
# name → (label, sampler settings over the SampleSection defaults)
SAMPLERS = {
    "mlfm": ("MLFM promotion", {"method": "mlfm"}),
    "flow": ("pure flow", {"method": "flow"}),
    "mdm": ("MDM ancestral", {"method": "mdm"}),
    "mlfm-g2": ("MLFM promotion, trajectories end at γ=2", {"method": "mlfm", "gamma_min": 2.0}),
    "mdm-t1": ("MDM ancestral, temperature 1", {"method": "mdm", "temperature": 1.0}),
}
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
        f"checkpoint.every={TRAIN_STEPS // 2}", "log.every=100", "train.eval_every=500", "log.plot_every=500",
        "sample.validation.every=500", *MODEL)
    print(f"trained {TRAIN_STEPS} steps in {time.perf_counter() - started:.0f} s → {run_dir}")
    return run_dir / "checkpoints" / latest.read_text().strip()


def exported_model() -> Path:
    """The cached export (EMA weights) of the trained checkpoint."""
    out = CACHE / "export"
    if not (out / "config.json").is_file():
        run("-m", "mlfm_scale.cli", "export", str(trained_checkpoint()), str(out), "--overwrite")
    return out


def measure(model, sampler: str, steps: int, samples: int, length: int) -> dict:
    """Validity rate and NFE of ``samples`` unconditional and as many prompted samples."""
    from mlfm_scale.config import SampleSection
    from mlfm_scale.sample.sampler import generate
    from mlfm_scale.sample.validation import score_sample, validation_prompts

    tokenizer = model.tokenizer()
    prompts = [""] * samples + validation_prompts(samples)
    ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    cfg = SampleSection(**SAMPLERS[sampler][1], steps=steps, length=length, stop_at_eos=False)
    started = time.perf_counter()
    out = generate(model, ids, cfg)
    seconds = time.perf_counter() - started
    texts = [tokenizer.decode(i + g, skip_special_tokens=True) for i, g in zip(ids, out.generated)]
    scores = [score_sample(p, t) for p, t in zip(prompts, texts)]
    valid = [v for v, _ in scores]
    return {"sampler": sampler, "steps": steps, "valid_rate": sum(valid) / len(valid),
            "valid_sentences": sum(r for _, r in scores) / len(scores),
            "valid_rate_unconditional": sum(valid[:samples]) / samples,
            "valid_rate_prompted": sum(valid[samples:]) / samples, "nfe": float(out.nfe.double().mean()),
            "rounds": float(out.rounds.double().mean()), "seconds": seconds, "example": texts[samples]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("valid_rate", "valid_sentences"), ("valid samples", "valid sentences")):
        for sampler, (name, _) in SAMPLERS.items():
            mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in mine], [r[key] for r in mine], "o-", label=name)
            for r in mine:
                ax.annotate(str(r["steps"]), (r["nfe"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_ylim(bottom=-0.02)
        ax.set_xlabel("network evaluations per sample (NFE)")
        ax.set_ylabel(f"{label} (synthetic corpus checker)")
        ax.legend()
    fig.suptitle("small MLFM on the synthetic corpus: one network, five samplers (point labels: steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="unconditional samples, and as many prompted")
    parser.add_argument("--length", type=int, default=48, help="tokens generated per sample")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 32, 256])
    parser.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=list(SAMPLERS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sampler_quality.json"))
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "figures" / "sampler_quality.png"))
    args = parser.parse_args()

    import torch

    from mlfm_scale.inference import MLFMForInference

    torch.set_num_threads(1)  # the tiny model gains nothing from a second thread on this shared machine
    model = MLFMForInference.from_pretrained(exported_model())
    rows = []
    print(f"{'sampler':<7} {'steps':>5} {'NFE':>8} {'rounds':>7} {'valid':>6} {'uncond':>7} {'prompted':>8} "
          f"{'sentences':>9} {'s':>7}")
    for sampler in args.samplers:
        for steps in args.steps:
            r = measure(model, sampler, steps, args.samples, args.length)
            rows.append(r)
            print(f"{sampler:<7} {steps:>5} {r['nfe']:>8.1f} {r['rounds']:>7.1f} {r['valid_rate']:>6.2f} "
                  f"{r['valid_rate_unconditional']:>7.2f} {r['valid_rate_prompted']:>8.2f} "
                  f"{r['valid_sentences']:>9.2f} {r['seconds']:>7.1f}",
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"samples": 2 * args.samples, "length": args.length, "rows": rows}, indent=1))
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot(rows, Path(args.plot))
    print(f"wrote {out} and {args.plot}")


if __name__ == "__main__":
    main()
