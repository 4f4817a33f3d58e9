"""``mlfm train CONFIG [key=value ...]``: pretrain an MLFM from streaming shards on 1..N processes.

The training story, top to bottom: processes and groups → shards' manifest checked against the config →
the objective → the model on megatron-core (the same weights for every layout, sliced by TP) under DeepSpeed:
ZeRO over DP with megatron TP as mpu, or pipeline stages × ZeRO-1 (train/steps.py hides which) → EMA → data →
resume → steps (evaluate, sample, log, checkpoint) → summary.

Run it under torchrun / the deepspeed launcher / SLURM, or let ``--nproc N`` start torchrun on this machine.
Every random draw of a step comes from a generator seeded by (seed, step, micro-batch, data-parallel rank),
so a resumed run repeats the uninterrupted one exactly.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mlfm_scale.config import Config, load_config
from mlfm_scale.errors import UserError
from mlfm_scale.train.preemption import StopRequest


class TrainingError(UserError):
    """Training cannot go on (repeated non-finite steps, incompatible resume)."""


def step_seed(seed: int, step: int, micro: int, dp_rank: int) -> int:
    """A 63-bit seed for one micro-batch's draws; equal on tensor-parallel peers."""
    digest = hashlib.blake2b(f"{seed}:{step}:{micro}:{dp_rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BadStepGuard:
    """Counts non-finite steps (DeepSpeed skips their update); raises after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def check(self, step: int, loss: float, grad_norm: float, last_checkpoint: str | None) -> bool:
        """True when the step was good."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise TrainingError(f"{self.in_a_row} non-finite steps in a row (loss {loss}, grad norm {grad_norm}) "
                                f"at step {step}; last good checkpoint: {last_checkpoint or 'none saved yet'}. "
                                "Lower train.lr or check the data, then resume from it.")
        return False


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    """Best FLOP/s of an n³ matmul here: the MFU denominator, measured rather than assumed."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def train(cfg: Config, stop: StopRequest | None = None) -> dict:
    """Run (or resume) training under ``cfg``; returns a summary (rank 0's view). When ``stop`` is requested
    (a launcher's preemption signal) the ranks stop together at a step boundary after a checkpoint, and the
    summary says ``preempted``."""
    from megatron.core import parallel_state as ps

    from mlfm_scale.data.loader import ReaderWorld, TrainData, data_fingerprint, load_manifest, to_micro_batch
    from mlfm_scale.flow.decision import misplacement_warning, window_of
    from mlfm_scale.model.attention import resolve_backend
    from mlfm_scale.model.flops import flops_per_token
    from mlfm_scale.model.mlfm import MLFMModel, embedding_square_sums
    from mlfm_scale.parallel import pipeline
    from mlfm_scale.parallel.mpu import MegatronMPU
    from mlfm_scale.parallel.state import init_distributed, init_model_parallel
    from mlfm_scale.train import checkpoint
    from mlfm_scale.train.decision import measure_decision
    from mlfm_scale.train.ema import EMA
    from mlfm_scale.train.engine import build_engine
    from mlfm_scale.train.metrics import MetricsLogger
    from mlfm_scale.train.objective import MLFMObjective
    from mlfm_scale.train.steps import DataParallelSteps, ObjectiveStep, PipelineSteps

    pipelined = cfg.parallel.pp > 1
    if pipelined:
        pipeline.check_supported(cfg)
    if cfg.objective.mse_weight > 0 and cfg.parallel.zero_stage == 3:
        raise UserError("objective.mse_weight > 0 needs the whole embedding table for x̂0, which ZeRO-3 partitions;"
                        " use parallel.zero_stage=1 (or 2) for runs with the x̂0 MSE term")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    rank, world = init_distributed(device)
    init_model_parallel(cfg.parallel, cfg.seed)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    out_dir, ckpt_dir = Path(cfg.out_dir), cfg.path(cfg.checkpoint.dir)

    manifest = load_manifest(cfg)  # pretraining shards, or SFT shards (response masks → the SFT objective)
    data_hash = data_fingerprint(cfg)
    tok = manifest["tokenizer"]
    vocab = cfg.model.vocab_size or tok["vocab_size"]
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    backend = resolve_backend(cfg.model.attention, device, dtype)
    objective = MLFMObjective(cfg.objective, tok["mask_id"], (tok["eos_id"], tok["pad_id"]))
    # the same initial weights for every layout: each piece draws them from (seed, piece); TP slices them
    if pipelined:
        net = pipeline.build_pipeline(cfg, vocab, dtype, backend, objective, sft=manifest["kind"] == "sft")
    else:
        model = MLFMModel(cfg.model, vocab, cfg.parallel.tp, dtype, backend, seed=cfg.seed)
    table = embedding_square_sums(net if pipelined else model, vocab).to(device)  # before ZeRO-3 partitions it
    dist.all_reduce(table)
    embedding_rms = float((table[0] / table[1]).sqrt())  # per-dimension RMS of E: what σ and γ are measured in
    if pipelined:
        engine, _, _ = build_engine(cfg, net.to(device), None, device)
        steps = PipelineSteps(engine, device, cfg.train.micro_batch_size)
        reader = ReaderWorld.first_pipeline_stage(cfg.parallel.pp)
    else:
        engine, _, _ = build_engine(cfg, ObjectiveStep(model, objective).to(device), MegatronMPU(), device)
        steps, reader = DataParallelSteps(engine, device), None
    # ZeRO-3 keeps gathered weights for reuse; the EMA swap must partition them first (a pinned private API)
    ema = EMA(engine.module, cfg.train.ema_decay, getattr(engine.optimizer, "_partition_all_parameters", None))
    data = TrainData(cfg, world=reader) if steps.reads_data else None  # later pipeline stages read nothing
    val = []
    if "val" in manifest["splits"]:
        val = _first_batches(cfg, reader, device) if steps.reads_data else [None] * cfg.train.eval_batches
    logger = MetricsLogger(cfg, out_dir, enabled=rank == 0)
    sampler = None  # samples scored by the synthetic corpus checker (needs parallel.tp=1)
    if cfg.sample.validation.every:
        from mlfm_scale.sample.validation import TrainingSamples

        sampler = TrainingSamples(cfg, model, objective, manifest, rank)

    state = {"step": 0, "samples": 0, "tokens": 0, "skipped": 0}
    last_checkpoint, decision, misplaced, warned = None, None, False, False
    decision_gammas = None  # the decision diagnostic's γ grid (MDM training has no γ to probe)
    if cfg.train.decision_points and cfg.objective.kind == "mlfm":
        decision_gammas = torch.linspace(cfg.objective.gamma_min, cfg.objective.gamma_max, cfg.train.decision_points,
                                         dtype=torch.float64)
    if cfg.train.resume is not None and (found := checkpoint.resolve(cfg.train.resume, ckpt_dir)) is not None:
        loading = time.perf_counter()
        client, own, info = checkpoint.load(engine, *found)
        if client["manifest_sha256"] != data_hash:
            raise TrainingError(f"{found[0] / found[1]} was trained on other shards (manifest hash differs); "
                                "point data.root at the original shards or start a new out_dir")
        state = client["state"]
        if data is not None:
            data.load_state_dict(client["loader"])
        objective.load_state_dict(client["objective"])
        decision = client.get("decision")
        _set_rng_state(client["rng"])
        ema.load_state_dict(own["ema"])
        last_checkpoint = str(found[0] / found[1])
        resumed = {"resumed_from": state["step"], "resume_s": time.perf_counter() - loading,
                   "checkpoint_bytes": checkpoint.size(found[0] / found[1])}
        logger.log(state["step"], resumed)
        logger.console(state["step"], cfg.train.steps, resumed, state["step"])

    sample_log = None
    if cfg.log.sample_ids and steps.reads_data:
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        sample_log = (out_dir / "samples" / f"rank{rank:05d}.jsonl").open("a", buffering=1)
    peak = measure_peak_flops(device, dtype)
    flops_token = flops_per_token(cfg.model, vocab, cfg.data.seq_len, posterior_mean=cfg.objective.mse_weight > 0)
    guard = BadStepGuard(cfg.train.max_bad_steps)
    guard.total = state["skipped"]
    start_step, started = state["step"], time.perf_counter()
    losses, preempted = {}, False
    while state["step"] < cfg.train.steps:
        step_start = time.perf_counter()
        batches = None
        if steps.reads_data:
            raws = [next(data) for _ in range(cfg.train.grad_accum)]
            if sample_log is not None:
                for micro, raw in enumerate(raws):
                    sample_log.write(json.dumps({"step": state["step"] + 1, "micro": micro,
                                                 "block_ids": raw["block_id"].tolist()}) + "\n")
            batches = [to_micro_batch(raw, device) for raw in raws]
        seeds = [step_seed(cfg.seed, state["step"], micro, dp_rank) for micro in range(cfg.train.grad_accum)]
        loss_mean, rows = steps.train(batches, seeds)  # rows: (γ, ce, tokens, p) per sequence of the step, all DP
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        good = guard.check(state["step"] + 1, loss_mean, grad_norm, last_checkpoint)
        if good:
            ema.update()
        if not engine.was_step_applied():  # skipped (overflow), and its LR step too: keep the schedule on the step
            engine.lr_scheduler.step()
        objective.observe(rows[0], rows[1], rows[3])
        tokens = int(rows[2].sum())
        state["step"] += 1
        state["samples"] += cfg.train.micro_batch_size * cfg.train.grad_accum * dp
        state["tokens"] += tokens
        state["skipped"] = guard.total
        if state["step"] % cfg.objective.active.update_every == 0:
            objective.update_curve()
        seconds = time.perf_counter() - step_start
        losses[state["step"]] = loss_mean
        if state["step"] % cfg.log.every == 0 or state["step"] == cfg.train.steps:
            tokens_per_s = tokens / seconds
            values = {"loss": loss_mean, "grad_norm": grad_norm, "lr": engine.get_lr()[0],
                      "tokens_per_s": tokens_per_s, "mfu": flops_token * tokens_per_s / (peak * world),
                      "step_s": seconds, "skipped": guard.total}
            if state["step"] == start_step + cfg.log.every or state["step"] == cfg.train.steps:
                values.update(_resident_bytes(engine))
            logger.log(state["step"], values)
            logger.console(state["step"], cfg.train.steps, values, start_step)
        if val and (state["step"] % cfg.train.eval_every == 0 or state["step"] == cfg.train.steps):
            val_seeds = [step_seed(cfg.seed, -1, i, dp_rank) for i in range(cfg.train.eval_batches)]
            values = {"val_loss": steps.evaluate(val, val_seeds)[0]}
            with ema.swapped():  # the weights that are exported and sampled from
                values["val_loss_ema"] = steps.evaluate(val, val_seeds)[0]
                if decision_gammas is not None:
                    decision = measure_decision(steps, objective, val, val_seeds, decision_gammas)
            if (window := window_of(decision)) is not None and decision_gammas is not None:
                values.update({f"decision_{k}": v for k, v in window.to_dict().items()})
                message = misplacement_warning(window, objective.schedule)
                values["decision_misplaced"] = float(message is not None)
                # warn once, when it persists over two evaluations: early on a model reads tokens only at low noise
                if message is not None and misplaced and not warned and rank == 0:
                    print(f"WARNING (step {state['step']}): {message}", file=sys.stderr, flush=True)
                    warned = True
                misplaced = message is not None
            logger.log(state["step"], values)
            if decision_gammas is not None:
                logger.log_profile(state["step"], "decision", decision)
            logger.console(state["step"], cfg.train.steps, values, start_step)
        if sampler is not None and state["step"] % cfg.sample.validation.every == 0:
            with ema.swapped():
                values = sampler(state["step"], window_of(decision))
            logger.log(state["step"], values)
            logger.console(state["step"], cfg.train.steps, values, start_step)
        preempted = stop is not None and stop.agreed(device) and state["step"] < cfg.train.steps
        if state["step"] % cfg.checkpoint.every == 0 or state["step"] == cfg.train.steps or preempted:
            client = {"state": state, "loader": None if data is None else data.state_dict(),
                      "objective": objective.state_dict(), "rng": _rng_state(), "manifest_sha256": data_hash,
                      "config": cfg.model_dump(mode="json"), "decision": decision}
            info = {"step": state["step"], "world_size": world, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
                    "dp": dp, "zero_stage": cfg.parallel.zero_stage, "manifest_sha256": data_hash,
                    "embedding_rms": embedding_rms,
                    "stages": pipeline.stage_boundaries(engine.module) if pipelined else None}
            saving = time.perf_counter()
            tag = checkpoint.save(engine, ckpt_dir, state["step"], client, {"ema": ema.state_dict()}, info,
                                  cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
            last_checkpoint = str(ckpt_dir / tag)
            logger.log(state["step"], {"checkpoint_s": time.perf_counter() - saving,
                                       "checkpoint_bytes": checkpoint.size(ckpt_dir / tag)})
        if state["step"] % cfg.log.plot_every == 0 or state["step"] == cfg.train.steps:
            curve = objective.curve
            logger.plot(None if curve is None else tuple(t.numpy() for t in curve.ce_curve()),
                        _density(objective.schedule, cfg), decision, _sampling_grid(objective.schedule, cfg, decision))
        if preempted:
            break
    logger.close()
    if sample_log is not None:
        sample_log.close()
    return {"state": state, "losses": losses, "last_checkpoint": last_checkpoint,
            "seconds": time.perf_counter() - started, "preempted": preempted}


def _resident_bytes(engine) -> dict[str, int]:
    """This rank's resident parameter bytes (its ZeRO-3 partition, or the whole local parameter) and optimizer
    state bytes (moments; under ZeRO the fp32 master partition too)."""
    params = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
                 for p in engine.module.parameters())
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    states = sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
                 if torch.is_tensor(t) and t.ndim > 0)
    masters = sum(t.numel() * t.element_size() for t in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    return {"resident_param_bytes": params, "resident_optimizer_bytes": states + masters}


def _density(schedule, cfg: Config) -> tuple:
    grid = torch.linspace(cfg.objective.gamma_min, cfg.objective.gamma_max, 200, dtype=torch.float64)
    return grid.numpy(), schedule.pdf(grid).numpy()


def _sampling_grid(schedule, cfg: Config, decision: dict | None) -> torch.Tensor:
    """The γ grid the configured sampler would use with the current training law and decision window."""
    from mlfm_scale.flow.decision import window_of
    from mlfm_scale.sample.grid import gamma_grid, sampling_range

    return gamma_grid(schedule, cfg.sample.steps, *sampling_range(cfg.sample, window_of(decision), schedule)[:2],
                      cfg.sample.grid)


def _first_batches(cfg: Config, reader, device: torch.device) -> list:
    """The first ``train.eval_batches`` validation batches of this rank, in order (a fixed evaluation set)."""
    from mlfm_scale.data.loader import TrainData, to_micro_batch

    val = TrainData(cfg, split="val", shuffle=False, world=reader)
    return [to_micro_batch(next(val), device) for _ in range(cfg.train.eval_batches)]


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--nproc", type=int, default=None,
                        help="start this many processes on this machine with torchrun (not under a launcher)")


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "mlfm_scale.cli", *argv]


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.nproc and "RANK" not in os.environ:
        return subprocess.call(torchrun_command(args.nproc, ["train", args.config, *args.overrides]))
    summary = train(cfg)
    if dist.get_rank() == 0:
        s = summary["state"]
        print(f"trained to step {s['step']} ({s['tokens']} tokens, {s['skipped']} skipped steps) in "
              f"{summary['seconds']:.1f} s; last checkpoint: {summary['last_checkpoint']}")
    dist.destroy_process_group()
    return 0
