"""Readers and the format part of the audit: one malformed file per error kind."""

import hashlib
import json

import pytest
from helpers import cli, write_jsonl

from skilltune.data.reader import load_examples, read_file
from skilltune.errors import DataError


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_all_four_formats_normalise_to_turns(tmp_path):
    rows = {
        "pc.jsonl": {"prompt": "Q", "completion": "A", "system": "S"},
        "chat.jsonl": {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A"}]},
        "alpaca.jsonl": {"instruction": "Q", "input": "", "output": "A", "system": "S"},
        "sharegpt.jsonl": {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                             {"from": "gpt", "value": "A"}]},
    }
    for name, row in rows.items():
        ex = load_examples(write_jsonl(tmp_path / name, [row]))[0]
        assert [(t.role, t.content, t.train) for t in ex.turns] == [
            ("system", "S", False), ("user", "Q", False), ("assistant", "A", True)], name


def test_message_weight_zero_is_not_trained(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", [{"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}])
    ex = load_examples(path)[0]
    assert [t.train for t in ex.turns if t.role == "assistant"] == [False, True]


def test_json_array_csv_parquet_with_column_mapping(tmp_path):
    from skilltune.config.schema import ColumnMap

    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "q1", "completion": "a1"}]))
    assert load_examples(tmp_path / "a.json")[0].completion == "a1"
    (tmp_path / "b.csv").write_text("question,answer\nq2,a2\n")
    cols = ColumnMap(prompt="question", completion="answer")
    ex = load_examples(tmp_path / "b.csv", columns=cols)[0]
    assert ex.completion == "a2" and ex.line == 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["q3"], "answer": ["a3"]}), tmp_path / "c.parquet")
    assert load_examples(tmp_path / "c.parquet", columns=cols)[0].completion == "a3"


GOOD = '{"prompt": "fine", "completion": "ok"}'
CASES = {
    "invalid_json": ([GOOD, '{"prompt": "x", "completion": '], 2, "invalid JSON"),
    "not_object": ([GOOD, '["a", "b"]'], 2, "must be a JSON object"),
    "missing_field": ([GOOD, '{"prompt": "x"}'], 2, "missing field 'completion'"),
    "empty_field": ([GOOD, '{"prompt": "x", "completion": "  "}'], 2, "'completion' is empty"),
    "not_string": ([GOOD, '{"prompt": "x", "completion": 5}'], 2, "must be a string"),
    "unknown_role": (['{"messages": [{"role": "robot", "content": "x"}]}'], 1,
                     "unknown role 'robot'"),
    "no_assistant": (['{"messages": [{"role": "user", "content": "x"}]}'], 1, "no assistant turn"),
    "ends_on_user": (['{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, '
                      '{"role": "user", "content": "z"}]}'], 1, "ends on a user turn"),
    "role_order": (['{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}'], 1,
                   "expected a user turn"),
    "mixed_format": ([GOOD, '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'],
                     2, "prompt_completion first at line 1, messages first at line 2"),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_format_error_names_its_line_and_keeps_input(tmp_path, kind):
    lines, bad_line, needle = CASES[kind]
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    before = _digest(path)
    code, out = cli("data", "audit", str(path), "--no-tokenizer")
    assert code == 1, out
    assert f"{path.name}:{bad_line}" in out.replace("\n", "")
    problems = read_file(path).problems
    assert any(p.line == bad_line and needle in p.message for p in problems), problems
    assert "Traceback" not in out
    assert _digest(path) == before


@pytest.mark.parametrize("row", [
    b'{"prompt": "half \\ud800 a character", "completion": "x"}',
    b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udfff"}]}',
    b'[{"prompt": "q", "chosen": "a", "rejected": "b \\ud83d"}]',
], ids=["prompt", "assistant turn", "rejected (JSON array)"])
def test_a_lone_surrogate_is_a_malformed_row_not_a_tokenizer_crash(tmp_path, row):
    path = tmp_path / ("pairs.json" if row.startswith(b"[") else "rows.jsonl")
    path.write_bytes(row + b"\n")
    rep = read_file(path)
    assert rep.examples == [] and [p.kind for p in rep.problems] == ["not_utf8"], rep.problems
    assert "lone surrogate" in rep.problems[0].message and rep.problems[0].line == 1
    with pytest.raises(DataError, match="lone surrogate"):
        load_examples(path)


def test_non_utf8_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n\r\n" + b'{"prompt": "caf\xe9", "completion": "x"}\r\n')
    before = _digest(path)
    rep = read_file(path)
    assert len(rep.examples) == 1
    assert [p.kind for p in rep.problems] == ["not_utf8"] and rep.problems[0].line == 3
    notes = " ".join(rep.notes)
    assert "BOM" in notes and "CRLF" in notes and "1 blank lines ignored" in notes
    code, out = cli("data", "audit", str(path), "--no-tokenizer")
    assert code == 1 and "odd.jsonl:3" in out and "Traceback" not in out
    assert _digest(path) == before


def test_empty_file_and_unreadable_input(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out = cli("data", "audit", str(empty), "--no-tokenizer")
    assert code == 1 and "empty" in out
    code, out = cli("data", "audit", str(tmp_path / "missing.jsonl"), "--no-tokenizer")
    assert code == 2 and "not found" in out
    (tmp_path / "x.txt").write_text("hello")
    code, out = cli("data", "audit", str(tmp_path / "x.txt"), "--no-tokenizer")
    assert code == 2 and "unsupported file type" in out


def test_load_examples_refuses_malformed_rows_with_lines(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, '{"prompt": 1}'])
    with pytest.raises(DataError, match=r"t.jsonl:2"):
        load_examples(path)
