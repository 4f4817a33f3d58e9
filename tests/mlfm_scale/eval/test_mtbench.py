import json
import uuid

import pytest

from mlfm_scale.eval.mtbench import (
    STOP_STRINGS,
    VICUNA_SYSTEM,
    answer_record,
    load_questions,
    truncate_at_stop,
    vicuna_prompt,
    write_answers,
)
from tests.conftest import REPO
from tests.mlfm_scale.eval import assert_line_refused

QUESTION_FILE = REPO / "data_prep" / "benchmarks" / "mt_bench_question.jsonl"


def test_load_questions():
    questions = load_questions(QUESTION_FILE)
    assert len(questions) == 80 and [q.question_id for q in questions] == list(range(81, 161))
    assert {q.category for q in questions} == {"writing", "roleplay", "reasoning", "math", "coding", "extraction",
                                               "stem", "humanities"}
    assert questions[0].category == "writing" and len(questions[0].turns) == 2
    assert questions[0].turns[0].startswith("Compose an engaging travel blog post about a recent trip to Hawaii")


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", ":2: expected an object with an integer 'question_id'"),
    ('{"question_id": "82", "category": "writing", "turns": ["q"]}', ":2: expected an object"),
    ('{"question_id": 82, "turns": ["q"]}', ":2: expected an object"),
    ('{"question_id": 82, "category": "writing", "turns": []}', ":2: 'turns' must be a non-empty list"),
    ('{"question_id": 82, "category": "writing", "turns": "q"}', ":2: 'turns' must be a non-empty list"),
    ('{"question_id": 81, "category": "writing", "turns": ["q"]}', ":2: question_id 81 already appears on line 1"),
    ("{", ":2: not valid JSON"),
])
def test_load_questions_names_the_bad_line(tmp_path, line, message):
    assert_line_refused(tmp_path, '{"question_id": 81, "category": "writing", "turns": ["q"]}', line, message,
                        load_questions)


def test_vicuna_prompt_is_fastchats_template():
    assert VICUNA_SYSTEM == ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                             "gives helpful, detailed, and polite answers to the user's questions.")
    assert vicuna_prompt("What is 2+2?") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: What is 2+2? ASSISTANT:")


@pytest.mark.parametrize("text, expected", [
    (" Four.</s>junk", "Four."),
    ("Four.\nUSER: and five?\nASSISTANT: Five.", "Four."),
    ("Line one\nline two\nASSISTANT: again", "Line one\nline two"),
    ("A USER: inline is kept</s>", "A USER: inline is kept"),
    ("\n  No stop at all  \n", "No stop at all"),
    ("</s>", ""),
])
def test_truncate_at_stop(text, expected):
    assert truncate_at_stop(text) == expected
    assert not any(s in truncate_at_stop(text) for s in STOP_STRINGS)


def test_answer_ids_are_stable_and_distinct():
    first = answer_record(81, "a", "mlfm-1b", 1.0)["answer_id"]
    assert answer_record(81, "other text", "mlfm-1b", 2.0)["answer_id"] == first  # a rerun keeps the id
    assert uuid.UUID(first).version == 5
    others = {answer_record(82, "a", "mlfm-1b", 1.0)["answer_id"], answer_record(81, "a", "mlfm-8b", 1.0)["answer_id"],
              answer_record(1, "a", "mlfm-1b8", 1.0)["answer_id"]}
    assert first not in others and len(others) == 3


def check_fastchat_answer(line: str) -> dict:
    """One line of a FastChat answer file, as ``gen_model_answer.py`` writes and ``llm_judge/common.py`` reads it."""
    answer = json.loads(line)
    assert set(answer) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert type(answer["question_id"]) is int
    assert isinstance(answer["answer_id"], str) and isinstance(answer["model_id"], str)
    assert isinstance(answer["tstamp"], float)
    [choice] = answer["choices"]
    assert set(choice) == {"index", "turns"} and choice["index"] == 0
    [turn] = choice["turns"]
    assert isinstance(turn, str)
    return answer


def test_write_answers_in_fastchats_schema(tmp_path):
    questions = load_questions(QUESTION_FILE)
    records = [answer_record(q.question_id, f"Answer to {q.question_id}: é \"quoted\"\nsecond line", "mlfm-1b",
                             1700000000.5) for q in reversed(questions)]
    path = tmp_path / "model_answer" / "mlfm-1b.jsonl"
    write_answers(path, records)
    lines = path.read_text().splitlines()
    answers = [check_fastchat_answer(line) for line in lines]
    assert [a["question_id"] for a in answers] == list(range(81, 161))
    assert answers[0]["choices"][0]["turns"][0] == "Answer to 81: é \"quoted\"\nsecond line"
    assert answers[0] == answer_record(81, "Answer to 81: é \"quoted\"\nsecond line", "mlfm-1b", 1700000000.5)
    assert [p.name for p in path.parent.iterdir()] == ["mlfm-1b.jsonl"]  # no temp file left
    with pytest.raises(ValueError, match=r"repeat question_ids \[81\]"):
        write_answers(path, records + records[-1:])
