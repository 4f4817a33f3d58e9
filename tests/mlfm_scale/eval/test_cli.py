"""`mlfm eval` end to end: re-scoring without a model, GSM8K byte-identical over ranks and batch sizes, the
other tasks' files, a checkpoint evaluated through the export path, and the errors."""
import json
import subprocess
import sys

import pytest

from mlfm_scale.cli import main
from mlfm_scale.eval.gsm8k import GSM8K_FILE, load_problems
from tests.conftest import REPO

FAST = ["--limit", "4", "--steps", "2"]


def mlfm_eval(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "mlfm_scale.cli", "eval", *map(str, args)], capture_output=True,
                            text=True, cwd=REPO, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_score_only_rescores_completions_without_a_model(tmp_path, capsys):
    problems = load_problems(GSM8K_FILE)[:20]
    lines = [{"index": p.index, "completion": f"so the answer is #### {p.gold}"} for p in problems]
    lines[3]["completion"] = "I do not know"
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["eval", "gsm8k", "--score-only", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "gsm8k" / "metrics.json").read_text())
    assert metrics["n"] == 20 and metrics["accuracy_strict"] == 19 / 20 and metrics["no_answer_strict"] == 1
    assert main(["eval", "gsm8k", "--score-only", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "x"),
                 "--model", "m"]) == 1
    assert "without a model" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_gsm8k_is_byte_identical_for_any_ranks_and_batch_size(export, tmp_path):
    mlfm_eval("gsm8k", "--model", export, "--out", tmp_path / "one", "--batch-size", "4", *FAST)
    mlfm_eval("gsm8k", "--model", export, "--out", tmp_path / "two", "--batch-size", "1", "--nproc", "2", *FAST)
    one, two = (tmp_path / run / "steps2" / "gsm8k" for run in ("one", "two"))
    assert (one / "predictions.jsonl").read_bytes() == (two / "predictions.jsonl").read_bytes()
    records = [json.loads(line) for line in (one / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2, 3] and all(r["completion"] for r in records)
    metrics = json.loads((one / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["steps"] == 2 and metrics["nfe"] > 0
    table = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert table["gsm8k"][0]["accuracy_flexible"] == metrics["accuracy_flexible"]


def test_mtbench_validity_and_a_sweep_write_their_files(export, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "mtbench", "validity", "--model", str(export), "--out", str(out), "--limit", "2",
                 "--steps", "1", "2", "--model-id", "tiny"]) == 0
    printed = capsys.readouterr().out
    rows = [line.split()[:3] for line in printed.splitlines() if line.split()[:1] in (["mtbench"], ["validity"])]
    assert rows == [["mtbench", "1", "2"], ["mtbench", "2", "2"], ["validity", "1", "4"], ["validity", "2", "4"]]
    answers = [json.loads(line) for line in
               (out / "steps2" / "mtbench" / "model_answer" / "tiny.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 82] and all(a["model_id"] == "tiny" for a in answers)
    validity = json.loads((out / "steps1" / "validity" / "metrics.json").read_text())
    assert validity["n"] == 4 and 0.0 <= validity["valid_rate"] <= 1.0
    table = json.loads((out / "metrics.json").read_text())
    assert [r["steps"] for r in table["validity"]] == [1, 2] and len(table["mtbench"]) == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and (out / "sweep.png").is_file()


@pytest.mark.multiprocess
def test_gamma_reads_a_checkpoint_through_the_export_path(dp2_run, shards, tmp_path):
    mlfm_eval("gamma", "--model", dp2_run / "checkpoints", "--data", shards, "--out", tmp_path, "--limit", "4")
    metrics = json.loads((tmp_path / "gamma" / "metrics.json").read_text())
    assert metrics["n"] == 4 and len(metrics["ce_by_gamma"]) == 16 and metrics["ce_training_corruption"] > 0
    assert len(metrics["all_masked"]["ce"]) == 16
    assert (tmp_path / "export" / "config.json").is_file()  # exported first


def test_errors_name_the_problem(tmp_path, export_dir, capsys):
    assert main(["eval", "gsm8k", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 1
    assert "no such export or checkpoint" in capsys.readouterr().err
    assert main(["eval", "gsm8k", "genppl", "--model", str(export_dir), "--out", str(tmp_path)]) == 1  # at once
    assert "set eval.judge" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "nonsense", "--model", str(export_dir), "--out", str(tmp_path)])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err
