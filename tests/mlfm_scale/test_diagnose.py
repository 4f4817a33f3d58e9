"""The decision diagnostic on a hand-built denoiser whose window is known in closed form, and `mlfm diagnose`."""
import json
import math

import pytest
import torch

from mlfm_scale.diagnose import decision_profile
from mlfm_scale.flow.decision import decision_window
from mlfm_scale.flow.schedules import bridge_time


class BayesDenoiser:
    """The exact posterior over a uniform vocabulary of i.i.d. tokens under the bridge: logits_v =
    −‖z − (1−t)m − t·e_v‖² / (2σ²t(1−t)). It decides where the token gap t²‖Δe‖² outgrows the noise σ²t(1−t),
    i.e. where d·s²·e^(−γ) ≈ 1 for a table of per-dimension std s (MLFM.md, Noise geometry)."""

    def __init__(self, vocab: int, d: int, std: float, sigma: float = 0.2):
        self.table = torch.randn(vocab + 1, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * std
        self.vocab, self.mask_id, self.sigma = vocab, vocab, sigma

    def embed(self, ids):
        return self.table[ids].float()

    def mask_embedding(self):
        return self.table[self.mask_id].float()

    def __call__(self, z, gamma, segment_ids=None):
        t = bridge_time(gamma.double(), self.sigma)[:, None, None]
        mean = (1 - t[..., None]) * self.table[self.mask_id] + t[..., None] * self.table[: self.vocab]
        distance = (z.double()[:, :, None, :] - mean).square().sum(-1)
        return (-distance / (2 * self.sigma**2 * t * (1 - t))).float()


def window_of_table(std: float, d: int = 16):
    denoiser = BayesDenoiser(64, d, std)
    ids = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))
    gamma = torch.linspace(-10, 10, 41, dtype=torch.float64)
    accuracy, ce = decision_profile(denoiser, ids, torch.ones_like(ids, dtype=torch.bool), gamma,
                                    torch.Generator().manual_seed(2))
    assert float(accuracy[0]) == 1.0 and float(accuracy[-1]) < 0.1 and float(ce[0]) < float(ce[-1])
    return decision_window(gamma, accuracy)


@pytest.mark.parametrize("std", [1.0, 0.1, math.sqrt(2 / (5 * 16))])
def test_the_diagnostic_finds_the_window_of_a_hand_built_denoiser(std):
    w = window_of_table(std)
    assert w.low - 0.2 <= math.log(16 * std**2) <= w.high + 0.2  # d·s²·e^(−γ) = 1 lies in the window
    assert w.high - w.low < 5.0


def test_the_window_moves_with_the_table_scale_and_sits_under_the_law_at_litgpt_scale():
    """N(0, 1) → std 0.1 moves the window down by log(1/0.01) = 4.6; the LitGPT table √(2/(5d)) puts it at
    γ ≈ −4…0, under the training law's normal component (loc −2.5)."""
    shift = window_of_table(1.0).mid - window_of_table(0.1).mid
    assert shift == pytest.approx(2 * math.log(10), abs=0.4)
    litgpt = window_of_table(math.sqrt(2 / (5 * 16)))
    assert -4.5 < litgpt.low and litgpt.high < 0.5


@pytest.mark.multiprocess
def test_mlfm_diagnose_records_the_window_in_an_export(tp2_run, shards, tmp_path, mlfm_cmd):
    import subprocess

    export = tmp_path / "export"
    subprocess.run([*mlfm_cmd, "export", str(tp2_run / "checkpoints"), str(export)], check=True, capture_output=True)
    trained = json.loads((export / "config.json").read_text())
    assert trained["decision"]["gamma"][0] == -10.0 and len(trained["decision"]["accuracy"]) == 17
    assert trained["embedding_rms"] == pytest.approx(math.sqrt(2 / (5 * 32)), rel=0.05)  # d = 32, LitGPT init
    result = subprocess.run([*mlfm_cmd, "diagnose", str(export), "--data", str(shards), "--blocks", "4",
                             "--points", "9"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "decision window" in result.stdout and (export / "decision.png").is_file()
    config = json.loads((export / "config.json").read_text())
    assert len(config["decision"]["gamma"]) == 9 and all(0 <= a <= 1 for a in config["decision"]["accuracy"])
    assert not list(export.glob("*.tmp"))
    missing = subprocess.run([*mlfm_cmd, "diagnose", str(export), "--data", str(tmp_path)], capture_output=True,
                             text=True)
    assert missing.returncode == 1 and "prepared shards" in missing.stderr
