"""What a run reports, on rank 0: a console line, ``metrics.jsonl`` always, wandb when enabled (offline by
default), and PNG plots (the loss curves; CE per γ-bin beside the active γ density)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from mlfm_scale.config import Config


class MetricsLogger:
    def __init__(self, cfg: Config, out_dir: Path, enabled: bool):
        self.cfg, self.out_dir, self.enabled = cfg, out_dir, enabled
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.started = time.perf_counter()
        self.wandb = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.file = (out_dir / "metrics.jsonl").open("a")
            if cfg.log.wandb:
                import wandb

                self.wandb = wandb.init(project=cfg.log.wandb_project, name=cfg.name, dir=str(out_dir),
                                        mode=cfg.log.wandb_mode, config=cfg.model_dump(mode="json"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.history.setdefault(key, []).append((step, value))
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def console(self, step: int, total: int, values: dict[str, float], start_step: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(1, step - start_step) * (total - step)
        parts = [f"step {step}/{total}"] + [f"{k} {v:.4g}" for k, v in values.items()]
        print(" | ".join(parts) + f" | ETA {eta:.0f}s", flush=True)

    def plot(self, curve_state: dict | None, density: tuple | None) -> None:
        """loss.png: every loss series so far; gamma.png: CE per γ-bin and the γ density sampled now."""
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
        if curve_state is None or density is None:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        centers, ce = curve_state
        ax.plot(centers, ce, "o-", ms=2, label="CE per γ-bin (EMA)")
        ax.set_xlabel("γ (log noise-to-signal)")
        ax.set_ylabel("CE (nats)")
        twin = ax.twinx()
        twin.plot(*density, color="tab:orange", label="γ density")
        twin.set_ylabel("density")
        fig.legend(loc="upper left")
        fig.savefig(self.out_dir / "gamma.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()
