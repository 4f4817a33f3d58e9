import json

import numpy as np

from mlfm_scale.config import load_config
from mlfm_scale.train.metrics import MetricsLogger


def test_metrics_jsonl_plots_and_offline_wandb(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["log.wandb=true", f"out_dir={tmp_path}"])
    logger = MetricsLogger(cfg, tmp_path, enabled=True)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 4.0 - step, "tokens_per_s": 100.0})
    logger.log(3, {"val_loss": 1.5})
    logger.console(3, 10, {"loss": 1.0}, start_step=0)
    grid = np.linspace(-10, 6, 20)
    logger.plot((grid, np.tanh(grid) + 2), (grid, np.ones_like(grid) / 16))
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "loss": 3.0, "tokens_per_s": 100.0} and rows[-1] == {"step": 3, "val_loss": 1.5}
    assert "step 3/10 | loss 1 | ETA" in capsys.readouterr().out
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "gamma.png").stat().st_size > 1000
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # offline by default: nothing leaves the machine


def test_non_zero_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(load_config(None), tmp_path / "r1", enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "r1").exists()
