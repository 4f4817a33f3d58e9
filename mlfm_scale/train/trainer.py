"""The training run: a :class:`Trainer` built from a config, whose ``run`` is a short sequence of named steps.

Build: processes and groups → shards' manifest checked against the config → the objective (pretraining's, or
with ``distill.teacher`` the distillation objective over its frozen teacher: train/distill.py) → the model on
megatron-core (the same weights for every layout, sliced by TP) under DeepSpeed: ZeRO over DP with megatron TP
as mpu, or pipeline stages × ZeRO-1 (train/steps.py hides which) → EMA → data → metrics → the checkpoint
manager, with which every piece of resumable state registers once (train/manager.py).

Run: resume → per step: next batches → train step (a non-finite step is skipped; too many in a row roll back
to the last good checkpoint) → log → evaluate → sample → checkpoint → plot → summary.

Every random draw of a step comes from a generator seeded by (seed, step, micro-batch, data-parallel rank),
so a resumed run repeats the uninterrupted one exactly.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mlfm_scale.config import Config
from mlfm_scale.errors import UserError
from mlfm_scale.redact import redact
from mlfm_scale.seeds import keyed_seed
from mlfm_scale.train.preemption import StopRequest


class TrainingError(UserError):
    """Training cannot go on (repeated non-finite steps after the allowed rollbacks, incompatible resume)."""


def step_seed(seed: int, step: int, micro: int, dp_rank: int) -> int:
    """A 63-bit seed for one micro-batch's draws; equal on tensor-parallel peers."""
    return keyed_seed(seed, step, micro, dp_rank)


class BadStepGuard:
    """Counts non-finite steps (their update is skipped); ``exhausted`` after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.since_save = limit, 0, 0

    def record(self, loss: float, grad_norm: float) -> bool:
        """True when the step was good."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.since_save += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit


@dataclass
class Counters:
    """Where the run is: optimizer steps, samples and tokens consumed, skipped steps and rollbacks so far."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    skipped: int = 0
    rollbacks: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


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


class Trainer:
    """Pretraining (or SFT, from SFT shards; or, with ``distill.teacher``, flow-map distillation) under ``cfg``.
    ``stop``: a launcher's preemption request; the ranks then stop together at a step boundary after a
    checkpoint."""

    def __init__(self, cfg: Config, stop: StopRequest | None = None):
        from megatron.core import parallel_state as ps

        from mlfm_scale.parallel import pipeline
        from mlfm_scale.parallel.state import init_distributed, init_model_parallel

        self.cfg, self.stop = cfg, stop
        self.pipelined = cfg.parallel.pp > 1
        if self.pipelined:
            pipeline.check_supported(cfg)
        if cfg.objective.mse_weight > 0 and cfg.parallel.zero_stage == 3:
            raise UserError("objective.mse_weight > 0 needs the whole embedding table for x̂0, which ZeRO-3 "
                            "partitions; use parallel.zero_stage=1 (or 2) for runs with the x̂0 MSE term")
        self.device = device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        self.rank, self.world = init_distributed(device)
        init_model_parallel(cfg.parallel, cfg.seed)
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.out_dir, self.ckpt_dir = Path(cfg.out_dir), cfg.path(cfg.checkpoint.dir)
        self.lock = self._take_run_lock()  # one writer per out_dir, before anything is written there
        try:
            self._build()
        except BaseException:  # an in-process caller (a test, a launcher) may build another Trainer here
            if self.lock is not None:
                self.lock.release()
            raise

    def _build(self) -> None:
        """The data, model, engine, EMA, metrics and the checkpoint manager's registry."""
        from mlfm_scale.data.loader import ReaderWorld, TrainData, data_fingerprint, load_manifest
        from mlfm_scale.model.attention import resolve_backend
        from mlfm_scale.model.flops import flops_per_token
        from mlfm_scale.model.mlfm import MLFMModel, embedding_square_sums
        from mlfm_scale.parallel import pipeline
        from mlfm_scale.parallel.mpu import MegatronMPU
        from mlfm_scale.train.decision import DecisionMonitor
        from mlfm_scale.train.ema import EMA
        from mlfm_scale.train.engine import build_engine
        from mlfm_scale.train.manager import CheckpointManager, Record, RngState
        from mlfm_scale.train.metrics import MetricsLogger
        from mlfm_scale.train.objective import MLFMObjective
        from mlfm_scale.train.steps import DataParallelSteps, ObjectiveStep, PipelineSteps

        cfg, device = self.cfg, self.device
        manifest = load_manifest(cfg)  # pretraining shards, or SFT shards (response masks → the SFT objective)
        self.data_hash = data_fingerprint(cfg)
        self.tokens = tok = manifest["tokenizer"]
        vocab = cfg.model.vocab_size or tok["vocab_size"]
        self.dtype = dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
        backend = resolve_backend(cfg.model.attention, device, dtype)
        if (manifest["kind"] == "sft") != (cfg.stage == "sft"):
            raise UserError(f"stage={cfg.stage}, but the data under {cfg.data.root} is {manifest['kind']} data: set "
                            f"stage={'sft' if manifest['kind'] == 'sft' else 'pretrain'} or point data.root at "
                            f"{'prompt/response' if cfg.stage == 'sft' else 'pretraining'} shards")
        special = (tok["eos_id"], tok["pad_id"])
        self.teacher = Record()  # distillation: where the teacher's weights came from
        if cfg.distill.teacher is None:
            self.objective = MLFMObjective(cfg.objective, tok["mask_id"], special, cfg.sft)
        else:
            self.objective = self._distill_objective(vocab, dtype, backend, tok["mask_id"], special)
        # the same initial weights for every layout: each piece draws them from (seed, piece); TP slices them
        if self.pipelined:
            net = pipeline.build_pipeline(cfg, vocab, dtype, backend, self.objective, sft=manifest["kind"] == "sft")
        else:
            net = model = MLFMModel(cfg.model, vocab, cfg.parallel.tp, dtype, backend, seed=cfg.seed)
        table = embedding_square_sums(net, vocab).to(device)  # before ZeRO-3 partitions it
        dist.all_reduce(table)
        self.embedding_rms = float((table[0] / table[1]).sqrt())  # per-dim. RMS of E: what σ and γ are measured in
        if self.pipelined:
            self.engine, _, _ = build_engine(cfg, net.to(device), None, device)
            self.steps = PipelineSteps(self.engine, device, cfg.train.micro_batch_size)
            reader = ReaderWorld.first_pipeline_stage(cfg.parallel.pp)
        else:
            self.engine, _, _ = build_engine(cfg, ObjectiveStep(model, self.objective).to(device), MegatronMPU(),
                                             device)
            self.steps, reader = DataParallelSteps(self.engine, device), None
        # ZeRO-3 keeps gathered weights for reuse; the EMA swap must partition them first (a pinned private API)
        self.ema = EMA(self.engine.module, cfg.train.ema_decay,
                       getattr(self.engine.optimizer, "_partition_all_parameters", None))
        if cfg.distill.target == "ema":
            self.objective.target_weights = self.ema.swapped
        self.data = TrainData(cfg, world=reader) if self.steps.reads_data else None  # later stages read nothing
        self.val = []
        if "val" in manifest["splits"]:
            self.val = self._first_batches(reader) if self.steps.reads_data else [None] * cfg.train.eval_batches
        self.logger = MetricsLogger(cfg, self.out_dir, enabled=self.rank == 0)
        self.sampler = None  # samples scored by the synthetic corpus checker (needs parallel.tp=1)
        if cfg.sample.validation.every:
            from mlfm_scale.sample.validation import TrainingSamples

            self.sampler = TrainingSamples(cfg, model, self.objective, manifest, self.rank)
        gammas = None  # a distilled student keeps its teacher's profile (the sampler ends trajectories by it)
        if cfg.train.decision_points and cfg.objective.kind == "mlfm" and cfg.distill.teacher is None:
            gammas = torch.linspace(cfg.objective.gamma_min, cfg.objective.gamma_max, cfg.train.decision_points,
                                    dtype=torch.float64)
        self.decision = DecisionMonitor(gammas, warn=self.rank == 0)
        if cfg.distill.teacher is not None:
            self.decision.load_state_dict(self.objective.teacher_profile)
        self.counters = Counters()
        self.origin = Record()  # train.init_from: where the initial weights came from
        self.guard = BadStepGuard(cfg.train.max_bad_steps)
        self.faults = set(cfg.train.inject_nonfinite)

        self.manager = CheckpointManager(self.engine, self.ckpt_dir, self.data_hash,
                                         redact(cfg.model_dump(mode="json")), cfg.checkpoint.keep_last,
                                         cfg.checkpoint.keep_every)
        for name, component in (("counters", self.counters), ("loader", self.data), ("objective", self.objective),
                                ("rng", RngState()), ("decision", self.decision), ("metrics", self.logger),
                                ("origin", self.origin), ("teacher", self.teacher)):
            self.manager.register(name, component)
        self.manager.register("ema", self.ema, per_rank=True)

        self.peak_flops = measure_peak_flops(device, dtype)
        self.flops_per_token = flops_per_token(cfg.model, vocab, cfg.data.seq_len,
                                               posterior_mean=cfg.objective.mse_weight > 0)
        self.last_checkpoint: str | None = None
        self.losses: dict[int, float] = {}
        self.sample_log = None
        if cfg.log.sample_ids and self.steps.reads_data:
            (self.out_dir / "samples").mkdir(parents=True, exist_ok=True)
            self.sample_log = (self.out_dir / "samples" / f"rank{self.rank:05d}.jsonl").open("a", buffering=1)

    # ---------------------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        """Run (or resume) to ``train.steps``; returns a summary (rank 0's view)."""
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> dict:
        self.resume()
        start_step, started = self.counters.step, time.perf_counter()
        self.start_step, preempted = start_step, False
        while self.counters.step < self.cfg.train.steps:
            step_start = time.perf_counter()
            batches = self.next_batches()
            loss, grad_norm, tokens = self.train_step(batches)
            if self.guard.exhausted:
                self.roll_back()
                continue
            self.log_step(loss, grad_norm, tokens, time.perf_counter() - step_start)
            self.evaluate_if_due()
            self.sample_if_due()
            preempted = self.stop_agreed()
            self.checkpoint_if_due(preempted)
            self.plot_if_due()
            if preempted:
                break
        self.logger.close()
        if self.sample_log is not None:
            self.sample_log.close()
        return {"state": self.counters.state_dict(), "losses": self.losses, "last_checkpoint": self.last_checkpoint,
                "seconds": time.perf_counter() - started, "preempted": preempted}

    # ---------------------------------------------------------------------------------------------- steps
    def resume(self) -> None:
        """Restore the checkpoint ``train.resume`` names (train/manager.py), or start afresh."""
        from mlfm_scale.train import checkpoint

        loading = time.perf_counter()
        teacher, self.teacher.value = self.teacher.value, {}
        found = self.manager.resume(self.cfg.train.resume)
        if found is not None and teacher and self.teacher.value != teacher:  # only from its own teacher
            saved = self.teacher.value
            differ = ", ".join(f"{k} {saved.get(k)} there, {v} now" for k, v in teacher.items() if saved.get(k) != v)
            what = f"was distilled from another teacher ({differ})" if saved else "is not a distillation run"
            raise TrainingError(f"the checkpoint resumed {what}: set distill.teacher (and distill.teacher_weights) "
                                "to the run's teacher, or start a new out_dir")
        self.teacher.value = self.teacher.value or teacher
        if found is None:  # rows of an earlier attempt here that saved no checkpoint belong to no timeline
            self.logger.load_state_dict({"step": 0})
            if self.cfg.train.init_from:
                self.initialise()
            return
        self._restored_schedule(announce=True)
        self.last_checkpoint = str(found[0] / found[1])
        resumed = {"resumed_from": self.counters.step, "resume_s": time.perf_counter() - loading,
                   "checkpoint_bytes": checkpoint.size(found[0] / found[1])}
        self.logger.log(self.counters.step, resumed)
        self.logger.console(self.counters.step, self.cfg.train.steps, resumed, self.counters.step)

    def initialise(self) -> None:
        """A new run from ``train.init_from``'s weights (fresh optimizer, schedule, data and curve); the EMA
        starts from them. A converted MDM must share this run's vocabulary and mask id."""
        t = self.cfg.train
        teacher = self.teacher.value  # a distillation's teacher, just verified: its student usually starts from it
        loaded = self.manager.initialise(t.init_from, t.init_weights, Path(teacher["teacher"]) if teacher else None)
        converted = loaded["client"].get("conversion") or {}
        for key, ours in (("vocab_size", self.cfg.model.vocab_size or self.tokens["vocab_size"]),
                          ("mask_id", self.tokens["mask_id"])):
            if key in converted and converted[key] != ours:
                raise UserError(f"train.init_from={t.init_from} was converted with {key} {converted[key]}, but this "
                                f"run's tokenizer (data manifest) has {ours}: prepare the data with the model's own "
                                "tokenizer (mlfm prep corpus ... --tokenizer)")
        self.ema.reset()
        self.origin.value = loaded["origin"]
        fresh = loaded["origin"]["fresh"]
        self._say(f"initial weights ({t.init_weights}) from {loaded['origin']['init_from']}"
                  + (f"; {len(fresh)} adapter/AdaLN tensors it lacks start fresh" if fresh else ""))

    def next_batches(self) -> list | None:
        """This step's ``train.grad_accum`` micro-batches (None on ranks that read no data)."""
        from mlfm_scale.data.loader import to_micro_batch

        if not self.steps.reads_data:
            return None
        raws = [next(self.data) for _ in range(self.cfg.train.grad_accum)]
        if self.sample_log is not None:
            for micro, raw in enumerate(raws):
                self.sample_log.write(json.dumps({"step": self.counters.step + 1, "micro": micro,
                                                  "block_ids": raw["block_id"].tolist()}) + "\n")
        return [to_micro_batch(raw, self.device) for raw in raws]

    def train_step(self, batches: list | None) -> tuple[float, float, int]:
        """One optimizer step: (mean loss, gradient norm, tokens). A non-finite step's update is skipped (by
        DeepSpeed), and so is its EMA update; the LR schedule stays keyed on the step count."""
        c, engine = self.counters, self.engine
        seeds = [step_seed(self.cfg.seed, c.step, micro, self.dp_rank) for micro in range(self.cfg.train.grad_accum)]
        self.objective.poisoned = c.step + 1 in self.faults
        self.faults.discard(c.step + 1)
        loss, rows = self.steps.train(batches, seeds)  # rows: STEP_ROWS per sequence of the step, all DP ranks
        self.objective.poisoned = False
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        good = self.guard.record(loss, grad_norm)
        if good:
            self.ema.update()
        if not engine.was_step_applied():  # skipped, and its LR step too: keep the schedule on the step
            engine.lr_scheduler.step()
        self.objective.observe(rows[0], rows[1], rows[3])
        tokens = int(rows[2].sum())
        c.step += 1
        c.samples += self.cfg.train.micro_batch_size * self.cfg.train.grad_accum * self.dp
        c.tokens += tokens
        c.skipped += not good
        if c.step % self.cfg.objective.active.update_every == 0:
            self.objective.update_curve()
        self.losses[c.step] = loss
        return loss, grad_norm, tokens

    def roll_back(self) -> None:
        """After ``train.max_bad_steps`` non-finite steps in a row: restore the last good checkpoint, keep the
        data position (past the offending batches), and go on; after ``train.max_rollbacks``, stop."""
        from mlfm_scale.train import checkpoint

        failed_at, rollbacks = self.counters.step, self.counters.rollbacks
        target = [None]

        def choose() -> None:
            target[0] = self.manager.last_good(before=failed_at)

        checkpoint.on_rank0(choose)
        dist.broadcast_object_list(target, src=0)
        tag = target[0]
        if tag is None or rollbacks >= self.cfg.train.max_rollbacks:
            where = f"last good checkpoint: {self.ckpt_dir / tag}" if tag else "no good checkpoint saved yet"
            raise TrainingError(
                f"{self.guard.in_a_row} non-finite steps in a row at step {failed_at} after {rollbacks} rollback(s) "
                f"(train.max_rollbacks={self.cfg.train.max_rollbacks}); {where}. Lower train.lr or check the data, "
                "then resume from it.")
        self.manager.load(self.ckpt_dir, tag, verified=True, keep=("loader",))
        self._restored_schedule(announce=False)
        # a restart after this must not resume from a checkpoint of the failed stretch
        checkpoint.on_rank0(lambda: checkpoint.publish_latest(self.ckpt_dir, tag))
        self.counters.rollbacks = rollbacks + 1
        self.guard.in_a_row = self.guard.since_save = 0
        self.last_checkpoint = str(self.ckpt_dir / tag)
        self._say(f"{self.cfg.train.max_bad_steps} non-finite steps in a row at step {failed_at}: rolled back to "
                  f"{self.ckpt_dir / tag} (rollback {rollbacks + 1} of {self.cfg.train.max_rollbacks}); the data "
                  "continues past the offending batches")
        self.logger.log(self.counters.step, {"rolled_back_from": failed_at})

    def log_step(self, loss: float, grad_norm: float, tokens: int, seconds: float) -> None:
        step, total = self.counters.step, self.cfg.train.steps
        if step % self.cfg.log.every and step != total:
            return
        tokens_per_s = tokens / seconds
        values = {"loss": loss, "grad_norm": grad_norm, "lr": self.engine.get_lr()[0], "tokens_per_s": tokens_per_s,
                  "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * self.world), "step_s": seconds,
                  "skipped": self.counters.skipped}
        if step == self.start_step + self.cfg.log.every or step == total:
            values.update(self._resident_bytes())
        self.logger.log(step, values)
        self.logger.console(step, total, values, self.start_step)

    def evaluate_if_due(self) -> None:
        """Validation loss of the raw and EMA weights, and the decision diagnostic of the EMA weights."""
        step, total = self.counters.step, self.cfg.train.steps
        if not self.val or (step % self.cfg.train.eval_every and step != total):
            return
        seeds = [step_seed(self.cfg.seed, -1, i, self.dp_rank) for i in range(self.cfg.train.eval_batches)]
        values = {"val_loss": self.steps.evaluate(self.val, seeds)[0]}
        with self.ema.swapped():  # the weights that are exported and sampled from
            values["val_loss_ema"] = self.steps.evaluate(self.val, seeds)[0]
            values.update(self.decision.measure(self.steps, self.objective, self.val, seeds, step))
        self.logger.log(step, values)
        if self.decision.gammas is not None:
            self.logger.log_profile(step, "decision", self.decision.profile)
        self.logger.console(step, total, values, self.start_step)

    def sample_if_due(self) -> None:
        from mlfm_scale.flow.decision import window_of

        step = self.counters.step
        if self.sampler is None or step % self.cfg.sample.validation.every:
            return
        with self.ema.swapped():
            values = self.sampler(step, window_of(self.decision.profile))
        self.logger.log(step, values)
        self.logger.console(step, self.cfg.train.steps, values, self.start_step)

    def stop_agreed(self) -> bool:
        return self.stop is not None and self.stop.agreed(self.device) and self.counters.step < self.cfg.train.steps

    def checkpoint_if_due(self, preempted: bool) -> None:
        from mlfm_scale.parallel import pipeline
        from mlfm_scale.train import checkpoint

        step, cfg = self.counters.step, self.cfg
        if step % cfg.checkpoint.every and step != cfg.train.steps and not preempted:
            return
        checkpoint.on_rank0(self._check_run_lock)
        info = {"step": step, "world_size": self.world, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": self.dp,
                "zero_stage": cfg.parallel.zero_stage, "manifest_sha256": self.data_hash,
                "embedding_rms": self.embedding_rms,
                # whether every step since the previous checkpoint was finite: a rollback target when so
                "good": self.guard.since_save == 0, "bad_steps": self.guard.since_save,
                "stages": pipeline.stage_boundaries(self.engine.module) if self.pipelined else None}
        saving = time.perf_counter()
        self.logger.step = step  # the metrics position saved: rows up to this step survive a resume from it
        tag = self.manager.save(step, info)
        self.guard.since_save = 0
        self.last_checkpoint = str(self.ckpt_dir / tag)
        self.logger.log(step, {"checkpoint_s": time.perf_counter() - saving,
                               "checkpoint_bytes": checkpoint.size(self.ckpt_dir / tag)})

    def plot_if_due(self) -> None:
        step, cfg = self.counters.step, self.cfg
        if step % cfg.log.plot_every and step != cfg.train.steps:
            return
        curve = self.objective.curve
        self.logger.plot(None if curve is None else tuple(t.numpy() for t in curve.ce_curve()), self._density(),
                         self.decision.profile, self._sampling_grid())

    # ---------------------------------------------------------------------------------------------- helpers
    def _distill_objective(self, vocab: int, dtype: torch.dtype, backend: str, mask_id: int, special: tuple):
        """Distillation (``distill.teacher``): the frozen teacher and the objective over it; the teacher's place
        and hash go into every checkpoint."""
        from mlfm_scale.train import checkpoint
        from mlfm_scale.train.distill import DistillObjective, load_teacher
        from mlfm_scale.train.manager import components

        cfg = self.cfg
        if not (cfg.model.flow_map and cfg.train.init_from):
            raise UserError("distill.teacher is set, but the student is not a flow-map network starting from weights "
                            "(model.flow_map, train.init_from): run distillation with `mlfm distill` (or `mlfm launch "
                            "distill`), whose student starts as its teacher")
        teacher, tag_dir, client = load_teacher(cfg, vocab, dtype, backend, self.device)
        self.teacher.value = {"teacher": str(tag_dir), "manifest_sha256": checkpoint.manifest_sha256(tag_dir),
                              "weights": cfg.distill.teacher_weights}
        return DistillObjective(cfg, mask_id, special, teacher, components(client))

    def _restored_schedule(self, announce: bool) -> None:
        """After a checkpoint restored the LR schedule: the horizon stays the checkpoint's unless
        ``train.schedule_steps`` moves it (logged); warmup and floor are the config's."""
        from mlfm_scale.train.engine import set_schedule

        t, scheduler = self.cfg.train, self.engine.lr_scheduler
        horizon = scheduler.lr_lambdas[0].total
        set_schedule(scheduler, t.warmup_steps, t.schedule_steps or horizon, t.min_lr_ratio)
        if not announce:
            return
        if t.schedule_steps is not None and t.schedule_steps != horizon:
            self._say(f"the LR schedule's horizon moves from {horizon} to {t.schedule_steps} steps "
                      "(train.schedule_steps)")
            self.logger.log(self.counters.step, {"schedule_steps": t.schedule_steps})
        elif t.schedule_steps is None and horizon != t.steps:
            self._say(f"train.steps={t.steps}, but the LR schedule keeps the horizon it was trained with, {horizon} "
                      f"steps; set train.schedule_steps={t.steps} to stretch it")

    def _take_run_lock(self):
        """Rank 0 takes out_dir's run lock (train/run_lock.py); a refusal is raised on every rank."""
        from mlfm_scale.train import checkpoint
        from mlfm_scale.train.run_lock import RunLock

        lock = [None]

        def take() -> None:
            lock[0] = RunLock(self.out_dir).acquire()

        checkpoint.on_rank0(take)
        return lock[0]

    def _check_run_lock(self) -> None:
        if self.lock is not None and self.lock.lost:
            raise TrainingError(f"{self.lock.path} was taken over by another writer (this run's heartbeat "
                                "stalled); stopping before writing a checkpoint over its files")

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(f"[mlfm train] {message}", file=sys.stderr, flush=True)

    def _first_batches(self, reader) -> list:
        """The first ``train.eval_batches`` validation batches of this rank, in order (a fixed evaluation set)."""
        from mlfm_scale.data.loader import TrainData, to_micro_batch

        val = TrainData(self.cfg, split="val", shuffle=False, world=reader)
        return [to_micro_batch(next(val), self.device) for _ in range(self.cfg.train.eval_batches)]

    def _resident_bytes(self) -> dict[str, int]:
        """This rank's resident parameter bytes (its ZeRO-3 partition, or the whole local parameter) and
        optimizer state bytes (moments; under ZeRO the fp32 master partition too)."""
        engine = self.engine
        params = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
                     for p in engine.module.parameters())
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        states = sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
                     if torch.is_tensor(t) and t.ndim > 0)
        masters = sum(t.numel() * t.element_size()
                      for t in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
        return {"resident_param_bytes": params, "resident_optimizer_bytes": states + masters}

    def _density(self) -> tuple:
        o = self.cfg.objective
        grid = torch.linspace(o.gamma_min, o.gamma_max, 200, dtype=torch.float64)
        return grid.numpy(), self.objective.schedule.pdf(grid).numpy()

    def _sampling_grid(self) -> torch.Tensor:
        """The γ grid the configured sampler would use with the current training law and decision window."""
        from mlfm_scale.flow.decision import window_of
        from mlfm_scale.sample.grid import gamma_grid, sampling_range

        schedule, s = self.objective.schedule, self.cfg.sample
        low, high = sampling_range(s, window_of(self.decision.profile), schedule)[:2]
        return gamma_grid(schedule, s.steps, low, high, s.grid)
