"""MT-Bench, first turn (MLFM.md, Evaluation protocol): questions, the Vicuna prompt, answers in FastChat's format.

The answers are judged outside this project, by FastChat's ``llm_judge`` with a GPT-4-class judge grading each
answer alone (single mode). FastChat's stock ``mt_bench`` question set asks for both turns: ``gen_judgment.py``
also makes a second-turn match for every question with two turns and fails on an answer with one. A copy of the
set cut to its first turn (``mt_bench_turn1``) makes it skip those, and ``show_result.py`` then reports the first
turn alone. With ``ANSWERS`` the file :func:`write_answers` wrote and ``MODEL_ID`` the ``model_id`` in it (FastChat
takes a model's name from its answer file's name, so the two must agree)::

    git clone https://github.com/lm-sys/FastChat && cd FastChat && pip install -e ".[model_worker,llm_judge]"
    cd fastchat/llm_judge
    mkdir -p data/mt_bench_turn1/model_answer data/mt_bench_turn1/reference_answer
    python -c "import json; [print(json.dumps({**q, 'turns': q['turns'][:1]})) \\
        for q in map(json.loads, open('data/mt_bench/question.jsonl'))]" > data/mt_bench_turn1/question.jsonl
    cp data/mt_bench/reference_answer/gpt-4.jsonl data/mt_bench_turn1/reference_answer/
    cp ANSWERS data/mt_bench_turn1/model_answer/MODEL_ID.jsonl
    export OPENAI_API_KEY=...
    python gen_judgment.py --bench-name mt_bench_turn1 --mode single --judge-model gpt-4 \\
        --model-list MODEL_ID --parallel 2
    python show_result.py --bench-name mt_bench_turn1 --mode single --judge-model gpt-4 --model-list MODEL_ID

``gen_judgment.py`` shows the number of matches (80) and waits for Enter before it calls the API. The math,
reasoning and coding questions are graded against ``reference_answer/<judge-model>.jsonl``: a judge other than
``gpt-4`` needs that file copied under its name.

Checked against FastChat 0e6d3e4 (April 2025): ``fastchat/conversation.py``, ``fastchat/llm_judge/
gen_model_answer.py``, ``gen_judgment.py``, ``common.py`` and ``show_result.py``.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from mlfm_scale.durable import atomic_write_text
from mlfm_scale.errors import UserError
from mlfm_scale.eval import BENCHMARKS, cut_at_stop, read_jsonl

# FastChat's "vicuna_v1.1" template: SeparatorStyle.ADD_COLON_TWO with sep=" ", sep2="</s>"; a prompt for one user
# turn is system + sep + "USER: " + question + sep + "ASSISTANT:" (no space after the last colon)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
MTBENCH_FILE = BENCHMARKS / "mt_bench_question.jsonl"  # lm-sys/FastChat's MT-Bench questions, 80
STOP_STRINGS = ("</s>", "\nUSER:", "\nASSISTANT:")  # sep2 ends a turn; a new role line means the turn ran over
ANSWER_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/lm-sys/FastChat/mt_bench/answer_id")


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]


def load_questions(path: str | Path) -> list[Question]:
    """The questions of an MT-Bench ``question.jsonl`` (``question_id``, ``category``, ``turns``; other keys such
    as ``reference`` are ignored), in file order."""
    path = Path(path)
    questions, seen_at = [], {}
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict) or type(row.get("question_id")) is not int \
                or not isinstance(row.get("category"), str):
            raise UserError(f"{where}: expected an object with an integer 'question_id' and a string 'category'")
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise UserError(f"{where}: 'turns' must be a non-empty list of strings")
        qid = row["question_id"]
        if qid in seen_at:
            raise UserError(f"{where}: question_id {qid} already appears on line {seen_at[qid]}")
        seen_at[qid] = lineno
        questions.append(Question(qid, row["category"], tuple(turns)))
    if not questions:
        raise UserError(f"{path} holds no questions")
    return questions


def vicuna_prompt(first_turn: str) -> str:
    return f"{VICUNA_SYSTEM} USER: {first_turn} ASSISTANT:"


def truncate_at_stop(text: str) -> str:
    """``text`` up to its first stop string, with surrounding whitespace stripped (as FastChat strips answers)."""
    return cut_at_stop(text, STOP_STRINGS).strip()


def answer_id(model_id: str, question_id: int) -> str:
    """A uuid5 of the pair, so a rerun writes the same ids (FastChat draws a random one)."""
    return str(uuid.uuid5(ANSWER_IDS, json.dumps([model_id, question_id])))


def answer_record(question_id: int, answer_text: str, model_id: str, tstamp: float) -> dict:
    """One line of FastChat's answer file, as ``gen_model_answer.py`` writes it, with one choice of one turn."""
    return {"question_id": question_id, "answer_id": answer_id(model_id, question_id), "model_id": model_id,
            "choices": [{"index": 0, "turns": [answer_text]}], "tstamp": tstamp}


def write_answers(path: str | Path, records: list[dict]) -> None:
    """Write ``records`` (from :func:`answer_record`) atomically to ``path``, one JSON line each, by question_id;
    FastChat's reader keeps one answer per question, so a repeated question_id is refused."""
    ids = [r["question_id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers repeat question_ids {sorted({q for q in ids if ids.count(q) > 1})}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(records, key=lambda r: r["question_id"])
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in ordered))
