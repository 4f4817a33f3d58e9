"""``mlfm export``: a TP=2 × ZeRO-3 and a PP=2 × ZeRO-1 checkpoint consolidated, loaded by the plain-PyTorch
inference model, give the training engine's logits; a tampered or truncated shard is refused; a failed or killed
export leaves the previous one complete."""
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from mlfm_scale.cli import main
from mlfm_scale.errors import UserError
from mlfm_scale.export import export
from mlfm_scale.inference import MLFMForInference
from tests.conftest import REPO
from tests.distributed import run_distributed
from tests.mlfm_scale.conftest import PIPELINE
from tests.mlfm_scale.train.engine_worker import load_and_probe, load_and_probe_pipeline
from tests.mlfm_scale.train.test_training import BASE

pytestmark = pytest.mark.multiprocess


def probe_inputs(d=32, vocab=300):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 32, d, generator=g)
    return z, torch.tensor([-4.0, 1.5]), torch.tensor([[0] * 20 + [1] * 12, [0] * 32])


def test_exported_model_gives_the_training_engines_logits(tp2_run, shards, tmp_path, capsys):
    """Same weights, same inputs: the engine (megatron TP=2, ZeRO-3 gathering, vocab-parallel output) and the
    exported model (one device, plain PyTorch) agree to float32 reduction-order noise (1e-5), for both the raw
    and the EMA weights."""
    tag = tp2_run / "checkpoints" / "step00000008"
    assert main(["export", str(tp2_run / "checkpoints"), str(tmp_path / "ema")]) == 0  # the `latest` tag
    assert "ema weights" in capsys.readouterr().out
    summary = export(tag, tmp_path / "raw", weights="raw")
    assert summary["parameters"] == sum(t.numel() for t in MLFMForInference.from_pretrained(tmp_path / "raw")
                                        .state_dict().values())
    probe = probe_inputs()
    engine = run_distributed(load_and_probe, 2, [*BASE, f"data.root={shards}", "parallel.tp=2"], str(tag),
                             probe)
    for weights in ("raw", "ema"):
        model = MLFMForInference.from_pretrained(tmp_path / weights)
        logits = model(*probe)
        assert logits.shape == engine[0][weights].shape == (2, 32, 300)
        torch.testing.assert_close(logits, engine[0][weights], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(engine[0]["raw"], engine[0]["ema"])  # two different exports were compared

    out = tmp_path / "ema"
    config = json.loads((out / "config.json").read_text())
    assert config["weights"] == "ema" and config["source_checkpoint"] == str(tag) and config["vocab_size"] == 300
    assert config["gamma_curve"]["counts"]["dtype"] == "float64" and config["mask_id"] == 2
    assert config["gamma_curve"]["knots"] is None  # 8 steps are too little evidence for a first fit
    assert config["decision"]["gamma"][0] == -10.0 and config["embedding_rms"] > 0
    assert json.loads((out / "generation_config.json").read_text())["steps"] == 256
    assert MLFMForInference.from_pretrained(out).tokenizer().get_vocab_size() == 300


def test_exported_pipeline_gives_the_pipeline_engines_logits(pp2_run, shards, tmp_path):
    """A PP=2 checkpoint (per-layer weight files, per-stage ZeRO-1 optimizer shards, pipeline layer names):
    the stages run by hand and the exported one-device model agree to 1e-5, raw and EMA weights."""
    tag = pp2_run / "checkpoints" / "step00000008"
    for weights in ("raw", "ema"):
        export(tag, tmp_path / weights, weights=weights)
    probe = probe_inputs()
    stages = run_distributed(load_and_probe_pipeline, 2, [*BASE, f"data.root={shards}", *PIPELINE, "parallel.pp=2"],
                             str(tag), probe)
    assert stages[0] is None  # the last stage holds the logits
    for weights in ("raw", "ema"):
        logits = MLFMForInference.from_pretrained(tmp_path / weights)(*probe)
        torch.testing.assert_close(logits, stages[1][weights], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stages[1]["raw"], stages[1]["ema"])


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_export_refuses_a_damaged_shard(tp2_run, tmp_path, capsys, damage):
    tag = tmp_path / "step00000008"
    shutil.copytree(tp2_run / "checkpoints" / "step00000008", tag)
    victim = tag / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        del data[-64:]
    else:
        data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["export", str(tag), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlfm export: error: ") and "zero_pp_rank_0_mp_rank_01_optim_states.pt" in err
    assert ("truncated" if damage == "truncate" else "does not match its sha256") in err
    assert not (tmp_path / "out").exists()


def weights_of(out):
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def test_a_failed_export_leaves_the_previous_one(tp2_run, tmp_path, monkeypatch):
    """A write failing after the weights are written (here the tokenizer copy): the earlier export is untouched
    and nothing of the failed one is left behind."""
    tag, out = tp2_run / "checkpoints" / "step00000008", tmp_path / "export"
    export(tag, out, weights="ema")
    before = weights_of(out)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mlfm_scale.export.shutil.copyfile", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(tag, out, weights="raw", overwrite=True)
    assert json.loads((out / "config.json").read_text())["weights"] == "ema"
    assert all(torch.equal(before[n], t) for n, t in weights_of(out).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_killed_export_leaves_the_previous_one_and_the_next_export_cleans_up(tp2_run, tmp_path, capsys):
    """SIGKILL after the new weights and config are written: the earlier export is complete and loadable, the
    partial one sits in OUT.tmp; the next export removes it (saying so) and replaces the earlier one."""
    tag, out = tp2_run / "checkpoints" / "step00000008", tmp_path / "export"
    export(tag, out, weights="ema")
    script = ("import os, signal, sys\nfrom pathlib import Path\nimport mlfm_scale.export as e\n"
              "e.shutil.copyfile = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
              "e.export(Path(sys.argv[1]), Path(sys.argv[2]), weights='raw', overwrite=True)\n")
    killed = subprocess.run([sys.executable, "-c", script, str(tag), str(out)], capture_output=True, text=True,
                            cwd=REPO, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = tmp_path / "export.tmp"
    assert json.loads((partial / "config.json").read_text())["weights"] == "raw"
    assert not (partial / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["weights"] == "ema"
    assert MLFMForInference.from_pretrained(out).tokenizer().get_vocab_size() == 300

    export(tag, out, weights="raw", overwrite=True)
    assert f"WARNING: removed {partial}, left by an interrupted write" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["weights"] == "raw"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    MLFMForInference.from_pretrained(out)


def test_overwrite_refuses_a_directory_holding_other_files(tmp_path):
    """--overwrite replaces the whole OUT_DIR, so it refuses one that holds anything an export does not write."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files an export does not write \(notes.txt\)"):
        export(tmp_path / "step00000008", out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
