"""What every evaluation task shares: the model, the ranks, sharding by prompt index, seeded generation, gathering
on rank 0, and the results' files.

    ctx = EvalContext.open(cfg)                     # the export (a checkpoint is exported first), this rank
    done = ctx.generate({index: prompt text}, sampler, stop)   # {index: Completion}, gathered on rank 0

Prompt i goes to rank ``i mod world`` and is sampled from the seed (eval.seed, i) (``seeds.prompt_seed``), in
fixed-length rows (prompt + fill = the model's seq_len), so its completion is byte-identical for any number
of ranks and any batch size (on a GPU, as far as its kernels round a row alike in every batch shape: checked by
ops/gpu_check.py). One GPU per rank (bf16) when there is one, else the CPU (the export's dtype).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mlfm_scale.config import Config, SampleSection
from mlfm_scale.durable import atomic_write_text
from mlfm_scale.errors import UserError
from mlfm_scale.eval import cut_at_stop

METRICS = "metrics.json"


@dataclass
class Completion:
    """A prompt's generated text (cut at the first stop string), its token ids (through the first EOS, as
    sampled) and the network evaluations it took; ``too_long``: the prompt left no position to fill."""

    text: str
    token_ids: list[int]
    nfe: int
    too_long: bool = False


def resolve_model(cfg: Config, out: Path) -> Path:
    """The export to evaluate: ``eval.model`` (default ``out_dir/export``) when it is one; a checkpoint directory
    or tag is exported first, into ``out/export`` (rank 0; the others wait)."""
    from mlfm_scale.train import checkpoint

    given = Path(cfg.eval.model) if cfg.eval.model else cfg.path("export")
    if (given / "config.json").is_file():
        return given
    if not given.exists():
        raise UserError(f"eval.model={given}: no such export or checkpoint (run `mlfm export`, or the pipeline's "
                        "export stage, first)")
    target = out / "export"

    def write() -> None:
        from mlfm_scale.export import export

        ckpt_dir, tag = checkpoint.resolve(str(given), what="eval.model")
        export(ckpt_dir / tag, target, overwrite=True)

    if dist.is_initialized():
        checkpoint.on_rank0(write)  # collective: the others wait, and learn of its error
    else:
        write()
    return target


class EvalContext:
    """The loaded model on this rank's device, the ranks, and the settings of ``cfg.eval``."""

    def __init__(self, cfg: Config, model, export: Path, out: Path, rank: int, world: int):
        self.cfg, self.model, self.export, self.out, self.rank, self.world = cfg, model, export, out, rank, world
        self.tokenizer = model.tokenizer()
        self.device = next(model.parameters()).device
        self.throughput: dict[str, float] = {}  # of the last generate, on rank 0: seconds, prompts/s, NFE/s

    @classmethod
    def open(cls, cfg: Config) -> EvalContext:
        from mlfm_scale.inference import MLFMForInference
        from mlfm_scale.parallel.state import init_distributed

        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        rank, world = init_distributed(device) if "RANK" in os.environ else (0, 1)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        out = cfg.path(cfg.eval.out)
        export = resolve_model(cfg, out)
        dtype = torch.bfloat16 if device.type == "cuda" else None
        model = MLFMForInference.from_pretrained(export, device=device, dtype=dtype)
        return cls(cfg, model, export, out, rank, world)

    # ---------------------------------------------------------------------------------------------- sampling
    def sampler(self, protocol: dict, steps: int | None = None) -> SampleSection:
        """The export's sampler settings with a task's ``protocol`` over them (:func:`protocol_for`), and the
        ``steps`` of a sweep when given."""
        base = SampleSection.model_validate(self.model.generation_config or {})
        update = protocol_for(protocol, base.method, self.model.config) | ({} if steps is None else {"steps": steps})
        return SampleSection.model_validate({**base.model_dump(), **update})

    def generate(self, prompts: dict[int, str], sampler: SampleSection, stop: tuple[str, ...] = (),
                 what: str = "prompts") -> dict[int, Completion]:
        """Completions of ``prompts`` (index → text; "" samples unconditionally), gathered on rank 0 (other ranks
        get {}). This rank samples the indices ≡ rank mod world, ``eval.batch_size`` at a time."""
        from mlfm_scale.sample.sampler import generate
        from mlfm_scale.seeds import prompt_seed

        mine = [i for i in sorted(prompts) if i % self.world == self.rank]
        encoded = {i: self.tokenizer.encode(prompts[i], add_special_tokens=False).ids for i in mine}
        done: dict[int, Completion] = {}
        fits = [i for i in mine if len(encoded[i]) < self.model.seq_len]
        for i in set(mine) - set(fits):  # nothing to fill: scored as no answer
            done[i] = Completion("", [], 0, too_long=True)
        started = time.perf_counter()
        bar = Progress(len(prompts), what, enabled=self.rank == 0, world=self.world)
        size = self.cfg.eval.batch_size
        for start in range(0, len(fits), size):
            batch = fits[start:start + size]
            out = generate(self.model, [encoded[i] for i in batch], sampler.model_copy(update={"length": None}),
                           seeds=[prompt_seed(self.cfg.eval.seed, i) for i in batch])
            for i, tokens, nfe in zip(batch, out.generated, out.nfe.tolist()):
                text = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), stop)
                done[i] = Completion(text, tokens, int(nfe))
            bar.update(len(batch), int(out.nfe.sum()))
        bar.close()
        done = self.gather(done)
        seconds = time.perf_counter() - started
        self.throughput = {"seconds": seconds, "prompts_per_s": len(done) / seconds,
                           "nfe_per_s": sum(c.nfe for c in done.values()) / seconds}
        return done

    def gather(self, part: dict) -> dict:
        """The union of every rank's ``part`` on rank 0 ({} elsewhere)."""
        if self.world == 1:
            return part
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        return {k: v for p in parts for k, v in p.items()} if self.rank == 0 else {}

    # ---------------------------------------------------------------------------------------------- results
    def setting_dir(self, steps: int | None) -> Path:
        """Where a task writes its files (in a folder named for it): ``out``, or ``out/stepsN`` for a setting of
        a steps sweep."""
        return self.out / f"steps{steps}" if steps is not None else self.out


def protocol_for(protocol: dict, method: str, config: dict) -> dict:
    """A task's sampler ``protocol`` as it applies to an export sampled by ``method`` (``config``: its
    config.json): a flow-map student keeps its jumps per round (as distilled) and guides the logits
    (velocity-target guidance gives no distribution to jump with), or not at all when it was distilled from a
    guided teacher (the guidance is in its weights)."""
    if method != "flowmap":
        return protocol
    guided = {"guidance_scale": 0.0} if config.get("distilled_guidance") else {"guidance_target": "logits"}
    return {**{k: v for k, v in protocol.items() if k != "steps"}, **guided}


def mean_nfe(done: dict[int, Completion]) -> float:
    sampled = [c.nfe for c in done.values() if not c.too_long]
    return sum(sampled) / max(1, len(sampled))


class Progress:
    """A bar of prompts done on rank 0, with prompts/s and NFE/s (this rank's share scaled by the world size:
    the ranks run in step)."""

    def __init__(self, total: int, what: str, enabled: bool, world: int):
        self.bar, self.world, self.started, self.nfe = None, world, time.perf_counter(), 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=what.rstrip("s"), desc=what, leave=False, file=sys.stderr)

    def update(self, prompts: int, nfe: int) -> None:
        self.nfe += nfe
        if self.bar is not None:
            self.bar.update(prompts * self.world)
            elapsed = time.perf_counter() - self.started
            self.bar.set_postfix(nfe_per_s=f"{self.nfe * self.world / elapsed:.1f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")


def record_results(out: Path, results: list[dict], logger) -> None:
    """``out/metrics.json`` ({task: [a row per setting]}; an earlier run's rows of other tasks and settings are
    kept, the same task and steps replaced), the rows appended through ``logger`` (train.metrics' MetricsLogger:
    ``out/metrics.jsonl``, numbered on from the rows already there, and wandb), and the summary table."""
    path, table = out / METRICS, {}
    if path.is_file():
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError:
            print(f"WARNING: {path} is not JSON; it is replaced by this run's results", file=sys.stderr)
    for row in results:
        kept = [r for r in table.get(row["task"], []) if r.get("steps") != row["steps"]]
        table[row["task"]] = [*kept, row]
    write_json(path, table)
    logged = (out / "metrics.jsonl").read_text().count("\n") if (out / "metrics.jsonl").is_file() else 0
    for step, row in enumerate(results, start=logged):
        logger.log(step, row)
    print(f"{'task':<9} {'steps':>6} {'n':>6} {'NFE':>9}  results")
    for row in results:
        rest = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                         if k not in ("task", "steps", "n", "nfe"))
        print(f"{row['task']:<9} {str(row['steps'] or '-'):>6} {row.get('n', '-'):>6} "
              f"{row.get('nfe', float('nan')):>9.1f}  {rest}")


def plot_sweep(out: Path, results: list[dict]) -> None:
    """``out/sweep.png``: each swept task's headline metric against NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = {"gsm8k": "accuracy_flexible", "validity": "valid_sentences", "genppl": "gen_ppl"}
    swept = {t: sorted((r for r in results if r["task"] == t), key=lambda r: r["nfe"]) for t in headline}
    swept = {t: rows for t, rows in swept.items() if len(rows) > 1}
    if not swept:
        return
    fig, axes = plt.subplots(1, len(swept), figsize=(4.5 * len(swept), 3.5), squeeze=False)
    for ax, (task, rows) in zip(axes[0], swept.items()):
        ax.plot([r["nfe"] for r in rows], [r[headline[task]] for r in rows], "o-")
        for r in rows:
            ax.annotate(str(r["steps"]), (r["nfe"], r[headline[task]]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("NFE per sample")
        ax.set_title(f"{task}: {headline[task]} (labels: steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)


def as_row(task: str, steps: int | None, metrics: dict) -> dict:
    """A results row: the task, its sampler steps (None: not sampled), and its scalar metrics."""
    return {"task": task, "steps": steps, **{k: v for k, v in metrics.items() if isinstance(v, int | float)}}
