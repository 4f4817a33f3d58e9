"""What a run reports, on rank 0: a console line, ``metrics.jsonl`` always, wandb when enabled (offline by
default), and PNG plots (the loss curves; CE per γ-bin and the decision profile beside the γ density and the
sampling grid)."""
from __future__ import annotations

import json
import math
import secrets
import time
from pathlib import Path

from mlfm_scale.config import Config
from mlfm_scale.durable import atomic_write_text
from mlfm_scale.redact import redact

METRICS = "metrics.jsonl"


class MetricsLogger:
    """Rank 0 writes; the others hold the same object, disabled. Registered with the checkpoint manager: its
    state is the wandb run id (a resumed or requeued run continues the same wandb run) and the step it had
    logged to (a resume drops ``metrics.jsonl`` rows past the checkpoint, so no step is logged twice)."""

    def __init__(self, cfg: Config, out_dir: Path, enabled: bool):
        self.cfg, self.out_dir, self.enabled = cfg, out_dir, enabled
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.started = time.perf_counter()
        self.wandb, self.wandb_id, self.step = None, None, 0
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.file = (out_dir / METRICS).open("a")
            if cfg.log.wandb:
                self.wandb_id = secrets.token_hex(4)  # wandb run ids: short, [a-z0-9]

    def state_dict(self) -> dict:
        return {"wandb_id": self.wandb_id, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint at ``state["step"]``: rows logged past it belong to a timeline that was
        abandoned (a kill, a rollback) and are dropped; wandb resumes the checkpoint's run."""
        self.step = state["step"]
        if self.cfg.log.wandb:  # (a run that turned wandb off does not start it again)
            self.wandb_id = state.get("wandb_id") or self.wandb_id
        if not self.enabled:
            return
        self.file.close()
        path = self.out_dir / METRICS
        kept = [line for line in path.read_text().splitlines() if (step := _step_of(line)) is not None
                and step <= self.step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = path.open("a")
        self.history = {k: [(s, v) for s, v in rows if s <= self.step] for k, rows in self.history.items()}

    def _wandb(self):
        if self.wandb is None and self.wandb_id is not None:
            import wandb

            self.wandb = wandb.init(project=self.cfg.log.wandb_project, name=self.cfg.name, dir=str(self.out_dir),
                                    mode=self.cfg.log.wandb_mode, id=self.wandb_id, resume="allow",
                                    config=redact(self.cfg.model_dump(mode="json")))
        return self.wandb

    def log(self, step: int, values: dict[str, float]) -> None:
        self.step = max(self.step, step)
        if not self.enabled:
            return
        for key, value in values.items():
            self.history.setdefault(key, []).append((step, value))
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self._wandb() is not None:
            self.wandb.log(values, step=step)

    def console(self, step: int, total: int, values: dict[str, float], start_step: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(1, step - start_step) * (total - step)
        parts = [f"step {step}/{total}"] + [f"{k} {v:.4g}" for k, v in values.items()]
        print(" | ".join(parts) + f" | ETA {eta:.0f}s", flush=True)

    def log_profile(self, step: int, name: str, record: dict | None) -> None:
        """A profile (lists, e.g. the decision diagnostic) as one ``metrics.jsonl`` row ``{"step", name: record}``
        and, in wandb, a table ``name`` of its per-γ columns."""
        if not self.enabled or record is None:
            return
        self.file.write(json.dumps({"step": step, name: record}) + "\n")
        self.file.flush()
        if self._wandb() is not None:
            import wandb

            columns = [k for k, v in record.items() if isinstance(v, list)]
            rows = [list(r) for r in zip(*(record[k] for k in columns))]
            self.wandb.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def plot(self, curve_state: tuple | None, density: tuple | None, decision: dict | None = None,
             grid=None) -> None:
        """loss.png: every loss series so far; gamma.png: :func:`plot_gamma` of the run's γ curve, density,
        decision profile and sampling grid."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("loss", "val_loss"):
            if key in self.history:
                steps, values = zip(*[(s, v) for s, v in self.history[key] if math.isfinite(v)])
                ax.plot(steps, values, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats)")
        ax.legend()
        fig.savefig(self.out_dir / "loss.png", dpi=100)
        plt.close(fig)
        if density is not None:
            plot_gamma(self.out_dir / "gamma.png", density, curve_state, decision, grid, self.cfg.name)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def _step_of(line: str) -> int | None:
    """A metrics row's step; None for a line a killed run left half-written."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def plot_gamma(path: Path, density: tuple, ce_curve: tuple | None = None, decision: dict | None = None,
               grid=None, title: str = "") -> None:
    """One PNG of where training and sampling spend their effort against where the model decides: the training
    γ density (``density`` = (γ, pdf)), the γ curve's CE per bin (``ce_curve`` = (centres, CE)), the decision
    profile (``flow.decision.decision_record``: accuracy and CE with every position corrupted, its window
    shaded) and the sampling grid's points (``grid`` Tensor[N + 1]) as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.plot(*density, color="tab:orange", label="training γ density")
    ax.set_xlabel("γ (log noise-to-signal)")
    ax.set_ylabel("density")
    if grid is not None:
        ax.plot(grid.numpy(), [0.0] * grid.numel(), "|", color="black", ms=10, label="sampling grid")
    loss_ax = ax.twinx()
    if ce_curve is not None:
        loss_ax.plot(*ce_curve, "o", ms=2, color="tab:blue", label="CE per γ-bin (training)")
    if decision is not None:
        loss_ax.plot(decision["gamma"], decision["ce"], "s--", ms=3, color="tab:red", label="CE, all corrupted")
        acc_ax = ax.twinx()
        acc_ax.spines["right"].set_position(("axes", 1.13))
        acc_ax.plot(decision["gamma"], decision["accuracy"], "^-", ms=3, color="tab:green",
                    label="accuracy, all corrupted")
        acc_ax.set_ylim(-0.02, 1.02)
        acc_ax.set_ylabel("token accuracy")
        if decision.get("window") is not None:
            w = decision["window"]
            ax.axvspan(w["low"], w["high"], color="tab:green", alpha=0.12, label="decision window")
    loss_ax.set_ylabel("CE (nats)")
    fig.legend(loc="upper left", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
