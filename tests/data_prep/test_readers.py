import json

import pytest

from data_prep.readers import CorpusError, ReadStats, list_inputs, read_records
from mlfm_scale.config import PrepSection


def read(paths, **opts):
    stats = ReadStats()
    return list(read_records(list_inputs(paths), PrepSection(**opts), stats)), stats


def write_lines(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() + b"\n" for line in lines))
    return path


def test_jsonl_with_custom_field_and_empty_documents(tmp_path):
    f = write_lines(tmp_path / "a.jsonl", [json.dumps({"body": "one"}), json.dumps({"body": "  "}), "",
                                           json.dumps({"body": "two"})])
    docs, stats = read([f], text_field="body")
    assert docs == ["one", "two"] and (stats.documents, stats.empty) == (2, 1)


def test_malformed_json_names_file_and_line_or_is_counted(tmp_path):
    f = write_lines(tmp_path / "a.jsonl", [json.dumps({"text": "ok"}), "{not json", json.dumps({"text": "x"})])
    with pytest.raises(CorpusError, match=r"a\.jsonl:2: malformed JSON .*--skip-bad"):
        read([f])
    docs, stats = read([f], skip_bad=True)
    assert docs == ["ok", "x"] and stats.bad == 1


def test_missing_or_wrong_field(tmp_path):
    f = write_lines(tmp_path / "a.jsonl", [json.dumps({"content": "x"})])
    with pytest.raises(CorpusError, match=r"a\.jsonl:1: no field 'text' \(fields: \['content'\]\).*--text-field"):
        read([f])
    g = write_lines(tmp_path / "b.jsonl", [json.dumps({"text": 3})])
    with pytest.raises(CorpusError, match="is int, not a string"):
        read([g])
    h = write_lines(tmp_path / "c.jsonl", ["[1, 2]"])
    with pytest.raises(CorpusError, match="expected a JSON object"):
        read([h])


def test_invalid_utf8_fails_or_is_replaced_and_counted(tmp_path):
    f = write_lines(tmp_path / "a.jsonl", [b'{"text": "caf\xe9"}\n'])
    with pytest.raises(CorpusError, match=r"a\.jsonl:1: invalid UTF-8.*--utf8-errors replace"):
        read([f])
    docs, stats = read([f], utf8_errors="replace")
    assert docs == ["caf\ufffd"] and stats.utf8_replaced == 1


def test_text_files_and_directories(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("para one\nline two\n\npara two")
    (tmp_path / "d" / "a.txt").write_text("first file")
    (tmp_path / "d" / ".hidden").write_text("skip me")
    docs, stats = read([tmp_path / "d"])
    assert docs == ["first file", "para one\nline two\n\npara two"] and len(stats.sources) == 2
    assert read([tmp_path / "d" / "b.txt"], doc_per="paragraph")[0] == ["para one\nline two", "para two"]
    assert read([tmp_path / "d" / "b.txt"], doc_per="line")[0] == ["para one", "line two", "para two"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a doc", None, "another"], "n": [1, 2, 3]}), tmp_path / "c.parquet")
    docs, stats = read([tmp_path / "c.parquet"])
    assert docs == ["a doc", "another"] and stats.empty == 1
    with pytest.raises(CorpusError, match=r"no column 'body' \(columns: \['text', 'n'\]\)"):
        read([tmp_path / "c.parquet"], text_field="body")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(CorpusError, match="not a readable Parquet file"):
        read([tmp_path / "bad.parquet"])


def test_sft_pairs(tmp_path):
    f = write_lines(tmp_path / "s.jsonl", [json.dumps({"q": "2+2?", "a": "4"}), json.dumps({"q": "hi", "a": ""})])
    docs, stats = read([f], format="sft", prompt_field="q", response_field="a")
    assert docs == [("2+2?", "4")] and stats.empty == 1
    with pytest.raises(CorpusError, match="no field 'prompt'"):
        read([f], format="sft")


def test_sft_chat_template_wraps_the_prompt(tmp_path):
    f = write_lines(tmp_path / "s.jsonl", [json.dumps({"prompt": "Story of Mila.", "response": "Mila {ran}."})])
    docs, _ = read([f], format="sft", chat_template="USER:\n{prompt}\nASSISTANT:\n")
    assert docs == [("USER:\nStory of Mila.\nASSISTANT:\n", "Mila {ran}.")]


def test_a_chat_template_needs_sft_and_a_prompt_placeholder():
    with pytest.raises(ValueError, match="placeholder"):
        PrepSection(format="sft", chat_template="USER: hi")
    with pytest.raises(ValueError, match="format=sft"):
        PrepSection(format="jsonl", chat_template="USER:\n{prompt}\n")


def test_missing_inputs(tmp_path):
    with pytest.raises(CorpusError, match="input not found"):
        list_inputs([tmp_path / "nope.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no files"):
        list_inputs([tmp_path / "empty"])
