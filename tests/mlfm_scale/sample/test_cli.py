"""`mlfm sample` on a small export (``export_dir``: a random network with a real tokenizer): JSONL out, defaults,
errors."""
import json
import shutil

import pytest

from mlfm_scale.cli import main
from tests.mlfm_scale.sample.test_denoiser import CFG


def sample(capsys, *args):
    code = main(["sample", *args])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_prompts_to_jsonl_with_export_defaults(export_dir, capsys):
    code, lines, _ = sample(capsys, "--model", str(export_dir), "--prompt", "Story of Mila.", "--prompt", "",
                            "--no-stop-at-eos")
    assert code == 0 and [line["index"] for line in lines] == [0, 1]
    for line in lines:
        assert len(line["token_ids"]) == 6 and line["nfe"] == line["rounds"] * (3 + 1) and line["seconds"] > 0
        assert isinstance(line["text"], str) and line["method"] == "mlfm" and line["steps"] == 3
        assert line["gamma_min_source"] == "gamma_law_median"  # no measured window in this export
        assert -2.6 < line["gamma_min"] < -2.4  # median of 0.1 uniform[−10, 6] + 0.9 normal(−2.5, 2)
    assert lines[0]["prompt"] == "Story of Mila."
    _, again, _ = sample(capsys, "--model", str(export_dir), "--prompt", "Story of Mila.", "--prompt", "",
                         "--no-stop-at-eos")
    assert again == [dict(line, seconds=a["seconds"]) for line, a in zip(lines, again)]  # same seed, same samples


def test_gamma_min_auto_ends_in_the_recorded_decision_window(export_dir, tmp_path, capsys):
    measured = tmp_path / "measured"
    shutil.copytree(export_dir, measured)
    config = json.loads((measured / "config.json").read_text())
    config["decision"] = {"gamma": [-4.0, 0.0], "accuracy": [1.0, 0.1], "ce": [0.1, 4.0],
                          "window": {"low": -3.1, "mid": -1.75, "high": -0.4}}
    (measured / "config.json").write_text(json.dumps(config))
    _, lines, _ = sample(capsys, "--model", str(measured), "--prompt", "")
    assert (lines[0]["gamma_min"], lines[0]["gamma_min_source"]) == (-1.75, "decision_window")
    _, lines, _ = sample(capsys, "--model", str(measured), "--prompt", "", "--gamma-min", "-3")
    assert (lines[0]["gamma_min"], lines[0]["gamma_min_source"]) == (-3.0, "config")
    with pytest.raises(SystemExit):
        sample(capsys, "--model", str(measured), "--prompt", "", "--gamma-min", "low")
    assert "invalid float or auto value: 'low'" in capsys.readouterr().err


def test_prompts_file_flags_and_history(export_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"q": "Story of Omar."}\n\n{"q": "The capital of"}\n{"q": "12 plus"}\n')
    out = tmp_path / "out.jsonl"
    code, _, _ = sample(capsys, "--model", str(export_dir), "--prompts-file", str(prompts), "--prompt-field", "q",
                        "--method", "mdm", "--steps", "2", "--length", "4", "--batch-size", "2", "--history",
                        "--out", str(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and [line["prompt"] for line in lines] == ["Story of Omar.", "The capital of", "12 plus"]
    assert [line["batch_size"] for line in lines] == [2, 2, 1]
    assert all(line["nfe"] <= 2 and line["method"] == "mdm" and line["history"] for line in lines)


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--temperature", "0"], "temperature: Input should be greater than 0"),
    (["--prompt", "x", "--length", "40"], "exceeds the model's seq_len 32"),
    (["--prompts-file", "MISSING"], "prompts file not found"),
    (["--unconditional", "0"], "--unconditional needs a positive count"),
])
def test_bad_arguments_are_clear_errors(export_dir, capsys, args, message):
    code, _, err = sample(capsys, "--model", str(export_dir), *args)
    assert code == 1 and message in err and "Traceback" not in err


def test_missing_export_and_bad_prompts_file(tmp_path, capsys, export_dir):
    code, _, err = sample(capsys, "--model", str(tmp_path / "nothing"), "--prompt", "x")
    assert code == 1 and "run `mlfm export CHECKPOINT" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    code, _, err = sample(capsys, "--model", str(export_dir), "--prompts-file", str(bad))
    assert code == 1 and f"{bad}:2: malformed JSON" in err
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    (broken / "generation_config.json").write_text(json.dumps({"steps": 0}))
    code, _, err = sample(capsys, "--model", str(broken), "--prompt", "x")
    assert code == 1 and "generation_config.json of the export" in err and "steps" in err


def test_flowmap_method_samples_a_flow_map_export_and_refuses_others(export_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from mlfm_scale.model.common import TargetGammaEmbedding, conditioning_width

    code, _, err = sample(capsys, "--model", str(export_dir), "--prompt", "x", "--method", "flowmap")
    assert code == 1 and "`mlfm distill`" in err
    student = tmp_path / "student"  # the export plus a target-time embedding: a flow-map student
    shutil.copytree(export_dir, student)
    weights = load_file(student / "model.safetensors")
    embedding = TargetGammaEmbedding(CFG.time_embed_dim, CFG.time_hidden_size, conditioning_width(CFG))
    weights |= {f"target_gamma_embedding.{n}": t for n, t in embedding.state_dict().items()}
    save_file(weights, student / "model.safetensors")
    config = json.loads((student / "config.json").read_text())
    config["model"]["flow_map"] = True
    (student / "config.json").write_text(json.dumps(config))
    code, lines, _ = sample(capsys, "--model", str(student), "--prompt", "Story of Mila.", "--method", "flowmap",
                            "--steps", "2", "--no-promotion", "--no-stop-at-eos")
    assert code == 0 and len(lines[0]["token_ids"]) == 6 and lines[0]["method"] == "flowmap"
    assert (lines[0]["nfe"], lines[0]["rounds"]) == (2, 1)
