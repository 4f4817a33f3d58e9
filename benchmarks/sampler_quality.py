"""Sample quality against cost on the synthetic corpus: the MLFM sampler against MDM decoding, at matched NFE.

    python benchmarks/sampler_quality.py [--samples 16] [--steps 1 2 4 8 16 32 64 256] [--samplers ...]

Trains three networks of one shape (configs/tiny.yaml made 4 layers × d128, 2-process ZeRO-3 on CPU, the same
data) once and exports their EMA weights, cached under build/sampler_quality/NAME/ (delete a folder to retrain
it); the first two get the same budget, 3000 steps:
- ``mlfm``: the defaults (LitGPT-scale input table, clamped γ laws, adaptive curve);
- ``mdm``: ``objective.kind=mdm``, the same network trained as a plain masked diffusion model (the baseline);
- ``mlfm-unit-table``: ``model.embedding_std=1.0``, the N(0, 1) table this project used before (the "before"),
  600 steps: enough for its decision window to settle.
``mlfm-flowmap`` is ``mlfm`` distilled into a flow-map student (``mlfm distill``, 1000 steps), sampled with
``method=flowmap`` at up to 8 jumps per promotion round (and as a one-shot decoder), against the distillation
target (4 jumps ≥ 90 % of the teacher's 256-step validity at ≤ 1/20 of its NFE).
Each export gets ``mlfm diagnose`` (accuracy and CE against γ, every position corrupted); the windows of the
two MLFM networks are plotted in benchmarks/figures/decision_window.png. Then for each sampler and step count it
draws ``--samples`` unconditional and as many prompted samples (``Story of NAME.``) of ``--length`` tokens with
one seed and scores the sentences they wrote with the corpus checker (``data_prep.synth``). Every sampler runs
from this version's defaults (``SampleSection``; ``gamma_min=auto`` reads the export's decision window) with
only ``steps`` varied, unless its row says otherwise. Writes
benchmarks/results/sampler_quality.json, benchmarks/figures/sampler_quality.png and prints the table, plus the
target check: the default MLFM sampler against MDM ancestral at NFE 32 and 64 (interpolated on log NFE).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "sampler_quality"
TRAIN_STEPS = 3000
SHAPE = ["model.num_layers=4", "model.hidden_size=128", "model.ffn_hidden_size=352"]  # tiny.yaml, 4× wider/deeper
MODELS = {  # name → (training steps, overrides of the training run over SHAPE)
    "mlfm": (TRAIN_STEPS, []),
    "mdm": (TRAIN_STEPS, ["objective.kind=mdm"]),
    # the "before": where a N(0, 1) table decides (its window settles within a few hundred steps; a fifth of the
    # budget, on 2 cores)
    "mlfm-unit-table": (600, ["model.embedding_std=1.0"]),
    # retraining levers (trained only when asked for: --networks or --samplers naming them)
    "mlfm-6000": (2 * TRAIN_STEPS, []),
    "mlfm-sigma0.5": (TRAIN_STEPS, ["objective.sigma=0.5"]),
    # the curve's settings: blend fits 10× faster, and give the active component more of the law
    "mlfm-curve": (TRAIN_STEPS, ["objective.active.rate=0.02", "objective.mixture_weights=[0.05,0.05,0.9]"]),
    # width: twice as wide (head dim kept), the same steps and global batch
    "mlfm-wide": (TRAIN_STEPS, ["model.hidden_size=256", "model.ffn_hidden_size=704", "model.num_heads=8"]),
}
LEVERS = ("mlfm-6000", "mlfm-sigma0.5", "mlfm-curve", "mlfm-wide")
# distilled students: name → (teacher network, distillation steps, overrides of `mlfm distill` over SHAPE): FMLM's
# settings (AdamW lr 3e-4, β2 0.95, no weight decay, clip 1, constant LR after warmup); the EMA at 0.999, not
# FMLM's 0.9999, whose horizon is ten times this run
DISTILL_STEPS = 1000
DISTILLED = {
    "mlfm-flowmap": ("mlfm", DISTILL_STEPS, ["train.lr=3e-4", "train.weight_decay=0", "train.min_lr_ratio=1.0",
                                             "train.warmup_steps=50", "train.ema_decay=0.999"]),
}
FEW_STEPS = 8  # a flow-map student is sampled at up to this many jumps per round
# name → (label, network, sampler settings over the export's generation defaults)
SAMPLERS = {
    "mlfm": ("MLFM sampler (defaults)", "mlfm", {}),
    "mlfm-tempered": ("MLFM, tempered confidence (reference)", "mlfm", {"confidence_temperature": "tempered"}),
    "flow": ("pure flow (MLFM network)", "mlfm", {"method": "flow"}),
    "mdm-of-mlfm": ("MDM decoding of the MLFM network", "mlfm", {"method": "mdm"}),
    "mdm": ("MDM ancestral (MDM network)", "mdm", {"method": "mdm"}),
    "mlfm-unit-table": ("MLFM sampler, N(0,1) table (before; 600 steps)", "mlfm-unit-table", {}),
    "mlfm-6000": ("MLFM defaults, 6000 training steps (lever)", "mlfm-6000", {}),
    "mdm-of-mlfm-6000": ("MDM decoding, 6000-step MLFM network (lever)", "mlfm-6000", {"method": "mdm"}),
    "mlfm-sigma0.5": ("MLFM defaults, σ = 0.5 (lever)", "mlfm-sigma0.5", {}),
    "mdm-of-mlfm-sigma0.5": ("MDM decoding, σ = 0.5 network (lever)", "mlfm-sigma0.5", {"method": "mdm"}),
    "mlfm-curve": ("MLFM defaults, faster curve (lever)", "mlfm-curve", {}),
    "mdm-of-mlfm-curve": ("MDM decoding, faster-curve network (lever)", "mlfm-curve", {"method": "mdm"}),
    "mlfm-wide": ("MLFM defaults, d = 256 (lever)", "mlfm-wide", {}),
    "mdm-of-mlfm-wide": ("MDM decoding, d = 256 network (lever)", "mlfm-wide", {"method": "mdm"}),
    "flowmap": ("flow-map student of mlfm, K jumps per round", "mlfm-flowmap", {"method": "flowmap"}),
    "flowmap-oneshot": ("flow-map student, one round of K jumps", "mlfm-flowmap",
                        {"method": "flowmap", "promotion": False}),
}
DEFAULT_SAMPLERS = [s for s in SAMPLERS if SAMPLERS[s][1] not in LEVERS]
sys.path.insert(0, str(REPO))


def run(*args: str) -> None:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def prepared_data() -> Path:
    """The synthetic corpus of configs/tiny.yaml as shards (cached)."""
    from data_prep.shards import prepare_shards
    from data_prep.synth import write_synth_jsonl
    from mlfm_scale.config import load_config

    data = CACHE / "data"
    if not (data / "manifest.json").is_file():
        cfg = load_config(REPO / "configs" / "tiny.yaml")
        write_synth_jsonl(CACHE / "corpus.jsonl", cfg.data.synth.documents, cfg.data.synth.seed)
        prepare_shards([CACHE / "corpus.jsonl"], data, cfg.data.prep, cfg.data.seq_len, overwrite=True,
                       progress=False)
    return data


def exported_model(name: str) -> Path:
    """Train (cached) network ``name`` (or distil it from its teacher network), export its EMA weights and
    diagnose the export (a student keeps its teacher's decision profile)."""
    run_dir, export = CACHE / name / "run", CACHE / name / "export"
    if (export / "config.json").is_file():
        return export
    data = prepared_data()
    if name in DISTILLED:
        teacher, steps, overrides = DISTILLED[name]
        exported_model(teacher)
        command, overrides = "distill", [f"distill.teacher={CACHE / teacher / 'run' / 'checkpoints'}", *overrides]
    else:
        command, (steps, overrides) = "train", MODELS[name]
    if not (run_dir / "checkpoints" / "latest").is_file():
        started = time.perf_counter()
        run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mlfm_scale.cli", command,
            "configs/tiny.yaml", f"out_dir={run_dir}", f"data.root={data}", f"train.steps={steps}",
            f"checkpoint.every={steps // 2}", "log.every=100", "train.eval_every=500", "log.plot_every=500",
            *SHAPE, *overrides)
        print(f"{command}ed {name}: {steps} steps in {time.perf_counter() - started:.0f} s → {run_dir}", flush=True)
    run("-m", "mlfm_scale.cli", "export", str(run_dir / "checkpoints"), str(export), "--overwrite")
    if name not in ("mdm", *DISTILLED):
        run("-m", "mlfm_scale.cli", "diagnose", str(export), "--data", str(data), "--blocks", "32", "--points", "33")
    return export


def median_step_seconds(name: str) -> float:
    """The median logged step time of network ``name``'s run (2 processes on this machine)."""
    rows = [json.loads(line) for line in (CACHE / name / "run" / "metrics.jsonl").read_text().splitlines()]
    times = sorted(r["step_s"] for r in rows if "step_s" in r)
    return times[len(times) // 2]


def flowmap_target(by: dict[str, list[dict]]) -> dict | None:
    """The distillation target: the student's validity at 4 jumps per round ≥ 90 % of its teacher's at 256 SDE
    steps, at ≤ 1/20 of the NFE; with the distillation step's cost against a pretraining step's. None when the
    run measured neither point, or the teacher wrote no valid sentence."""
    teacher = next((r for r in by["mlfm"] if r["steps"] == 256), None)
    student = next((r for r in by["flowmap"] if r["steps"] == 4), None)
    if teacher is None or student is None or not teacher["valid_sentences"]:
        return None
    quality, cost = student["valid_sentences"] / teacher["valid_sentences"], student["nfe"] / teacher["nfe"]
    return {"teacher_256": teacher["valid_sentences"], "teacher_nfe": teacher["nfe"],
            "flowmap_4": student["valid_sentences"], "flowmap_nfe": student["nfe"], "quality_ratio": quality,
            "nfe_ratio": cost, "met": quality >= 0.9 and cost <= 1 / 20,
            "step_cost": median_step_seconds("mlfm-flowmap") / median_step_seconds("mlfm")}


def measure(model, sampler: str, steps: int, samples: int, length: int) -> dict:
    """Validity and NFE of ``samples`` unconditional and as many prompted samples."""
    from mlfm_scale.sample.cli import sampler_options
    from mlfm_scale.sample.sampler import generate
    from mlfm_scale.sample.validation import score_sample, validation_prompts

    tokenizer = model.tokenizer()
    prompts = [""] * samples + validation_prompts(samples)
    ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    # this version's sampler defaults (not the export's generation_config.json, which records the defaults of
    # the version that trained it); what the defaults derive from the model (gamma_min=auto) comes from the export
    cfg = sampler_options({}, argparse.Namespace(**SAMPLERS[sampler][2], steps=steps, length=length,
                                                 stop_at_eos=False))
    started = time.perf_counter()
    out = generate(model, ids, cfg)
    seconds = time.perf_counter() - started
    texts = [tokenizer.decode(i + g, skip_special_tokens=True) for i, g in zip(ids, out.generated)]
    scores = [score_sample(p, t) for p, t in zip(prompts, texts)]
    valid = [v for v, _ in scores]
    return {"sampler": sampler, "steps": steps, "valid_rate": sum(valid) / len(valid),
            "valid_sentences": sum(r for _, r in scores) / len(scores), "nfe": float(out.nfe.double().mean()),
            "rounds": float(out.rounds.double().mean()), "gamma_min": out.gamma_min, "seconds": seconds,
            "example": texts[samples]}


def at_nfe(rows: list[dict], nfe: float, key: str = "valid_sentences") -> float:
    """A sampler's ``key`` at ``nfe``, linear in log NFE between measured points (flat beyond its ends)."""
    pts = sorted((r["nfe"], r[key]) for r in rows)
    if nfe <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= nfe <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (math.log(nfe) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return pts[-1][1]


def plot_quality(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for sampler, (label, _, _) in SAMPLERS.items():
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["nfe"])
        if not mine:
            continue
        ax.plot([r["nfe"] for r in mine], [r["valid_sentences"] for r in mine], "o-", ms=4, label=label)
        for r in mine:
            ax.annotate(str(r["steps"]), (r["nfe"], r["valid_sentences"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_ylim(bottom=-0.02)
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("valid sentences (synthetic corpus checker)")
    ax.legend(fontsize=7)
    ax.set_title("4 × d128 networks on the synthetic corpus, 3000 steps each (point labels: steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_windows(exports: dict[str, Path], path: Path) -> None:
    """Accuracy against γ (every position corrupted) of the MLFM networks, beside their training γ densities."""
    import matplotlib
    import torch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlfm_scale.inference import MLFMForInference

    fig, ax = plt.subplots(figsize=(8, 4.5))
    density_ax = ax.twinx()
    for (name, export), color in zip(exports.items(), ("tab:blue", "tab:red")):
        config = json.loads((export / "config.json").read_text())
        d = config["decision"]
        label = f"{name} (embedding RMS {config['embedding_rms']:.3f})"
        ax.plot(d["gamma"], d["accuracy"], "o-", ms=3, color=color, label=f"accuracy, {label}")
        if d["window"] is not None:
            ax.axvspan(d["window"]["low"], d["window"]["high"], color=color, alpha=0.1)
        law = MLFMForInference.from_pretrained(export).gamma_schedule()
        grid = torch.linspace(law.gamma_min, law.gamma_max, 400, dtype=torch.float64)
        density_ax.plot(grid.numpy(), law.pdf(grid).numpy(), "--", color=color, label=f"training γ density, {name}")
    ax.set_xlabel("γ (log noise-to-signal)")
    ax.set_ylabel("token accuracy, every position corrupted")
    density_ax.set_ylabel("learned training γ density")
    fig.legend(loc="lower left", fontsize=7, bbox_to_anchor=(0.08, 0.14))
    ax.set_title("where the networks decide (shaded: decision window) and where training samples γ", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="unconditional samples, and as many prompted")
    parser.add_argument("--length", type=int, default=48, help="tokens generated per sample")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 256])
    parser.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=DEFAULT_SAMPLERS)
    parser.add_argument("--train-only", nargs="*", choices=list(MODELS), metavar="NETWORK",
                        help="train, export and diagnose these networks (default: all but the levers); sample "
                             "nothing")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sampler_quality.json"))
    parser.add_argument("--figures", default=str(REPO / "benchmarks" / "figures"))
    args = parser.parse_args()

    import torch

    from mlfm_scale.inference import MLFMForInference

    training_only = args.train_only is not None
    needed = (args.train_only or [m for m in MODELS if m not in LEVERS]) if training_only \
        else {SAMPLERS[s][1] for s in args.samplers}
    exports = {name: exported_model(name) for name in (*MODELS, *DISTILLED) if name in needed}
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    if {"mlfm-unit-table", "mlfm"} <= set(exports):
        plot_windows({n: exports[n] for n in ("mlfm-unit-table", "mlfm")}, figures / "decision_window.png")
    for name in exports:
        w = json.loads((exports[name] / "config.json").read_text()).get("decision")
        print(f"{name}: decision window {None if w is None else w['window']}")
    if training_only:
        return
    torch.set_num_threads(1)  # the small model gains nothing from a second thread on this shared machine
    models = {name: MLFMForInference.from_pretrained(export) for name, export in exports.items()}
    out = Path(args.out)
    # rows of samplers not run now are kept, so the samplers can be measured in parts
    rows = [r for r in json.loads(out.read_text())["rows"] if r["sampler"] not in args.samplers] \
        if out.is_file() else []
    print(f"{'sampler':<16} {'steps':>5} {'NFE':>8} {'rounds':>7} {'γ_min':>6} {'valid':>6} {'sentences':>9} {'s':>7}")
    for sampler in args.samplers:
        for steps in args.steps:
            if SAMPLERS[sampler][2].get("method") == "flowmap" and steps > FEW_STEPS:
                continue
            r = measure(models[SAMPLERS[sampler][1]], sampler, steps, args.samples, args.length)
            rows.append(r)
            print(f"{sampler:<16} {steps:>5} {r['nfe']:>8.1f} {r['rounds']:>7.1f} {r['gamma_min']:>6.2f} "
                  f"{r['valid_rate']:>6.2f} {r['valid_sentences']:>9.2f} {r['seconds']:>7.1f}", flush=True)
    by = {s: [r for r in rows if r["sampler"] == s] for s in SAMPLERS}
    target = {}
    if by.get("mlfm") and by.get("mdm"):
        for nfe in (32, 64):
            target[f"nfe{nfe}"] = {"mlfm": at_nfe(by["mlfm"], nfe), "mdm": at_nfe(by["mdm"], nfe)}
        target["best"] = {s: max(r["valid_sentences"] for r in by[s]) for s in ("mlfm", "mdm")}
        met = all(v["mlfm"] >= v["mdm"] for v in target.values() if isinstance(v, dict)) and \
            target["best"]["mlfm"] > target["best"]["mdm"]
        print(f"target (MLFM ≥ MDM ancestral at NFE 32 and 64, best above): {'met' if met else 'missed'} {target}")
    if by.get("flowmap") and by.get("mlfm"):
        target["flowmap"] = flowmap_target(by)
        print("flow-map target (4 jumps ≥ 90 % of the teacher's 256 steps at ≤ 1/20 NFE): "
              f"{target['flowmap'] or 'not measured (needs --steps with 4 and 256, and a teacher with valid samples)'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"samples": 2 * args.samples, "length": args.length, "rows": rows, "target": target},
                              indent=1))
    plot_quality(rows, figures / "sampler_quality.png")
    print(f"wrote {out}, {figures / 'sampler_quality.png'} and {figures / 'decision_window.png'}")


if __name__ == "__main__":
    main()
