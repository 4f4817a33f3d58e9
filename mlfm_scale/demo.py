"""``mlfm demo``: the main job on the embedded default — no downloads, data and tokenizer made here.

Synthesise the demo corpus → train its tokenizer and write streaming shards → pretrain the tiny MLFM with
2-process ZeRO-3 on CPU (``--nproc``) → checkpoint → resume from the checkpoint for more steps → print the
validation loss curve → export the EMA weights → sample from the export → say where everything was written.
Each run replaces the previous demo run's outputs, so it runs only in an out_dir of its own (marked ``.mlfm-demo``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mlfm_scale.config import Config, load_config
from mlfm_scale.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
MARKER = ".mlfm-demo"  # in an out_dir the demo created: only there does it replace what a previous run left


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (default: %(default)s)")
    parser.add_argument("--resume-steps", type=int, default=200,
                        help="steps trained again after resuming from the first phase's checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=400")


def _train(config: str, nproc: int, overrides: list[str]) -> None:
    from mlfm_scale.train.loop import run_local

    if run_local(nproc, ["train", config, *overrides]):
        raise UserError("training failed (its error is above)")


def _mlfm(*args: str) -> None:
    if subprocess.call([sys.executable, "-m", "mlfm_scale.cli", *args]):
        raise UserError(f"`mlfm {args[0]}` failed (see above)")


def _strictly_inside(path: Path, directory: Path) -> bool:
    return directory.resolve() in path.resolve().parents


def prepare_demo_dir(cfg: Config) -> Path:
    """Make ``cfg.out_dir`` the demo's own and clear a previous demo run's checkpoints and metrics; returns
    out_dir. The demo replaces its corpus, shards, checkpoints and metrics on every run, so it runs only in
    an out_dir that is new, empty or marked by an earlier demo, and only with those paths inside it."""
    out = Path(cfg.out_dir)
    for key, path in (("data.root", cfg.path(cfg.data.root)), ("checkpoint.dir", cfg.path(cfg.checkpoint.dir))):
        if not _strictly_inside(path, out):
            raise UserError(f"{key} ({path}) is not inside out_dir {out}, and the demo replaces it on every run: "
                            f"give {key} as a path relative to out_dir")
    if out.exists() and not (out / MARKER).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out_dir {out} was not created by `mlfm demo` (it has no {MARKER} file), and the demo "
                        "replaces the checkpoints, metrics and data in its out_dir: choose another out_dir (e.g. "
                        f"`mlfm demo out_dir=runs/demo-2`) or remove {out} yourself")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    ckpt_dir = cfg.path(cfg.checkpoint.dir)
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    return out


def run(args: argparse.Namespace) -> int:
    from data_prep.shards import prepare_shards
    from data_prep.synth import write_synth_jsonl
    from mlfm_scale.sample.validation import score_sample, validation_prompts

    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()
    out = prepare_demo_dir(cfg)
    corpus = cfg.path("corpus/synth.jsonl")
    size = write_synth_jsonl(corpus, cfg.data.synth.documents, cfg.data.synth.seed)
    print(f"[demo] synthetic corpus: {cfg.data.synth.documents} documents, {size / 1e6:.2f} MB → {corpus}")
    data_dir = cfg.path(cfg.data.root)
    manifest = prepare_shards([corpus], data_dir, cfg.data.prep, cfg.data.seq_len, overwrite=True)
    counts = manifest["splits"]["train"]
    print(f"[demo] shards: {counts['blocks']} train blocks of {cfg.data.seq_len} tokens, vocab "
          f"{manifest['tokenizer']['vocab_size']} → {data_dir}")

    first, ckpt_dir, metrics = cfg.train.steps, cfg.path(cfg.checkpoint.dir), out / "metrics.jsonl"
    print(f"[demo] phase 1: {args.nproc}-process ZeRO-3 training for {first} steps")
    _train(args.config, args.nproc, args.overrides)
    print(f"[demo] phase 2: resume from {ckpt_dir / (ckpt_dir / 'latest').read_text()} for {args.resume_steps} steps")
    _train(args.config, args.nproc, [*args.overrides, "train.resume=auto",
                                     f"train.steps={first + args.resume_steps}"])

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    val = [(r["step"], r["val_loss"], r["val_loss_ema"]) for r in rows if "val_loss" in r]
    print("[demo] validation loss (nats per corrupted token):")
    for step, loss, ema in val:
        print(f"         step {step:5d}  {loss:.3f}  (EMA weights {ema:.3f})")
    if val[-1][1] >= val[0][1]:
        raise UserError(f"validation loss did not fall ({val[0][1]:.3f} → {val[-1][1]:.3f})")
    export_dir, samples = out / "export", out / "demo_samples.jsonl"
    print(f"[demo] phase 3: export the EMA weights of {ckpt_dir / 'latest'} → {export_dir}; sample 2 blocks "
          "unconditionally and 2 after a prompt (2 SDE steps per promotion round; trajectories end in the model's "
          "decision window)")
    _mlfm("export", str(ckpt_dir), str(export_dir), "--overwrite")
    prompts = [arg for prompt in ["", "", *validation_prompts(2)] for arg in ("--prompt", prompt)]
    _mlfm("sample", "--model", str(export_dir), *prompts, "--steps", "2", "--length", "48", "--out", str(samples))
    for line in samples.read_text().splitlines():
        row = json.loads(line)
        _, sentences = score_sample(row["prompt"], row["prompt"] + row["text"])
        print(f"         [{row['nfe']} NFE, {row['rounds']} rounds, {sentences:.0%} of its sentences valid] "
              f"{row['prompt'] + row['text']!r}")
    print(f"[demo] done in {time.perf_counter() - started:.0f} s. Written under {out}/: corpus/, {cfg.data.root}/ "
          f"(shards, tokenizer, manifest), {cfg.checkpoint.dir}/ (sharded checkpoints, latest), metrics.jsonl, "
          "loss.png, gamma.png, export/ (safetensors, config, tokenizer), demo_samples.jsonl")
    return 0
