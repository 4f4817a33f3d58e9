import json

import pytest

from mlfm_scale.errors import UserError
from mlfm_scale.eval.gsm8k import (
    extract_flexible,
    extract_strict,
    is_correct,
    load_problems,
    normalise_number,
    prompt_of,
    read_completions,
    score,
    write_results,
)
from tests.conftest import REPO
from tests.mlfm_scale.eval import assert_line_refused

TEST_FILE = REPO / "data_prep" / "benchmarks" / "gsm8k_test.jsonl"

# completion → (strict, flexible)
EXTRACTIONS = {
    "She makes 9 * 2 = $18 a day.\n#### 18": ("18", "18"),
    "### 42": ("42", "42"),
    "#### 1,234,567 dollars": ("1234567", "1234567"),
    "The house costs $80,000.": (None, "80000"),
    "#### $1,234.50": ("1234.5", "1234.5"),
    "So the answer is \\boxed{72}.": (None, "72"),
    "#### \\boxed{3.50}": ("3.5", "3.5"),
    "The total is 4.0 kg.": (None, "4"),
    "#### 6/8 of the pie": ("3/4", "3/4"),
    "Each gets 8/4 = 2 apples, so 12/4": (None, "3"),
    "The temperature is -5 degrees.\n#### -5": ("-5", "-5"),
    "10-4 = 6, then 6-10": (None, "10"),
    "He saves 25%.\n#### 25%": ("25", "25"),
    "It is 0.50 of it": (None, "0.5"),
    "I do not know.": (None, None),
    "#### none": (None, None),
    "#### 12\nWait, that is wrong.\n#### 15": ("15", "15"),
    "### 7 ... #### 9 ... ### 11 and then 13": ("11", "13"),
    "#### 20\n\nUSER: next question costs 7": ("20", "7"),
    "Pick 3,4 or 5": (None, "5"),
}


@pytest.mark.parametrize("completion", EXTRACTIONS)
def test_extractors(completion):
    assert (extract_strict(completion), extract_flexible(completion)) == EXTRACTIONS[completion]


@pytest.mark.parametrize("text, expected", [
    ("18", "18"), (" 2,125 ", "2125"), ("$80,000", "80000"), ("\\boxed{1,000}", "1000"), ("18.", "18"),
    ("3.50", "3.5"), ("4.0", "4"), ("007", "7"), ("-0", "0"), (".5", "0.5"), ("6/8", "3/4"), ("8/4", "2"),
    ("-6/8", "-3/4"), ("25%", "25"), ("5/0", None), ("eighteen", None), ("3 4", None), ("", None),
])
def test_normalise_number(text, expected):
    assert normalise_number(text) == expected


def test_is_correct_compares_exact_values():
    assert is_correct("3/4", "3/4") and is_correct("0.75", "3/4") and is_correct("2", "2")
    assert not is_correct(None, "2") and not is_correct("0.33", "1/3") and not is_correct("-2", "2")


@pytest.fixture(scope="module")
def problems():
    return load_problems(TEST_FILE)


def test_load_problems(problems):
    assert len(problems) == 1319
    first = problems[0]
    assert first.index == 0 and first.question.startswith("Janet") and first.gold == "18"
    assert first.answer.endswith("#### 18")
    assert [p.index for p in problems] == list(range(1319))
    assert all(normalise_number(p.gold) == p.gold for p in problems)
    assert prompt_of(first) == f"USER:\n{first.question}\nASSISTANT:\n"


@pytest.mark.parametrize("line, message", [
    ("{not json", ":2: not valid JSON"),
    ('["question", "answer"]', ":2: expected an object"),
    ('{"question": "q"}', ":2: expected an object"),
    ('{"question": "q", "answer": "it is 4"}', ":2: the answer has no '####"),
    ('{"question": "q", "answer": "#### four"}', ":2: the final answer 'four'"),
])
def test_load_problems_names_the_bad_line(tmp_path, line, message):
    assert_line_refused(tmp_path, '{"question": "q", "answer": "#### 1"}', line, message, load_problems)


def test_load_problems_missing_or_empty(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        load_problems(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no problems"):
        load_problems(tmp_path / "empty.jsonl")


def test_gold_solutions_score_perfectly(problems):
    head = problems[:200]
    records, metrics = score(head, {p.index: p.answer for p in head})
    assert metrics == {"n": 200, "accuracy_strict": 1.0, "accuracy_flexible": 1.0,
                       "no_answer_strict": 0, "no_answer_flexible": 0}
    assert records[0] == {"id": 0, "question": head[0].question, "completion": head[0].answer, "strict": "18",
                          "flexible": "18", "gold": "18", "correct": {"strict": True, "flexible": True}}


def test_solutions_of_other_problems_score_near_zero(problems):
    head = problems[:200]
    shifted = {p.index: head[(p.index + 1) % len(head)].answer for p in head}  # a fixed derangement
    _, metrics = score(head, shifted)
    assert metrics["accuracy_strict"] < 0.1 and metrics["accuracy_flexible"] < 0.1


def test_score_counts_missing_answers_as_wrong(problems):
    records, metrics = score(problems, {0: "#### 18", 1: "no idea", 5: "maybe 3, #### unsure"})
    assert [r["id"] for r in records] == [0, 1, 5]
    assert metrics["n"] == 3 and metrics["accuracy_strict"] == pytest.approx(1 / 3)
    assert metrics["no_answer_strict"] == 2 and metrics["no_answer_flexible"] == 1
    with pytest.raises(UserError, match="does not have"):
        score(problems[:2], {0: "#### 18", 7: "#### 1"})
    with pytest.raises(UserError, match="no completions"):
        score(problems, {})


def test_read_completions(tmp_path):
    path = tmp_path / "completions.jsonl"
    path.write_text('{"index": 2, "completion": "#### 3", "prompt": "ignored"}\n\n{"index": 0, "completion": ""}\n')
    assert read_completions(path, 3) == {2: "#### 3", 0: ""}


@pytest.mark.parametrize("line, message", [
    ("{oops", ":2: not valid JSON"),
    ('{"completion": "x"}', ":2: expected an object with fields 'index' and 'completion'"),
    ('{"index": "1", "completion": "x"}', ":2: 'index' must be an integer"),
    ('{"index": true, "completion": "x"}', ":2: 'index' must be an integer"),
    ('{"index": 1, "completion": null}', ":2: 'index' must be an integer and 'completion' a string"),
    ('{"index": 3, "completion": "x"}', ":2: index 3 is outside the test file's 3 problems"),
    ('{"index": -1, "completion": "x"}', ":2: index -1 is outside"),
    ('{"index": 0, "completion": "x"}', ":2: index 0 already has a completion on line 1"),
])
def test_read_completions_errors(tmp_path, line, message):
    assert_line_refused(tmp_path, '{"index": 0, "completion": "#### 1"}', line, message,
                        lambda path: read_completions(path, 3))


def test_write_results(tmp_path, problems):
    records, metrics = score(problems[:3], {0: "#### 18", 2: "It is 70,000"})
    folder = write_results(tmp_path / "run", records, metrics)
    assert folder == tmp_path / "run" / "gsm8k"
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "predictions.jsonl"]  # no temp files left
    assert json.loads((folder / "metrics.json").read_text()) == metrics
    lines = (folder / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    write_results(tmp_path / "run", records[:1], metrics)  # a rerun replaces both files
    assert len((folder / "predictions.jsonl").read_text().splitlines()) == 1
