"""Schema-constrained SQL decoding: `skilltune data sql-grammar`, the `grammar` response format in generate, eval
and the server (vLLM's structured_outputs.grammar)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import pytest
from helpers import cli, write_jsonl

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sql"


def _matcher(tokenizer, text):
    from skilltune.model.structured import Grammar

    return Grammar.lark(text).matcher(tokenizer, tokenizer.eos_token_id, len(tokenizer)).m


def _accepts(tokenizer, text, sql) -> bool:
    m = _matcher(tokenizer, text)
    ids = tokenizer(sql, add_special_tokens=False)["input_ids"]
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from skilltune.model.target import load_target

    return load_target(str(tiny_model_dir)).tokenizer


def test_the_grammar_takes_every_reference_query_and_nothing_off_the_schema(tokenizer):
    from skilltune.evaluate.sql_grammar import sqlite_grammar

    text = sqlite_grammar(EXAMPLE / "data" / "analytics.db")
    references = [json.loads(line)["completion"] for split in ("train", "val", "test")
                  for line in (EXAMPLE / "data" / f"{split}.jsonl").read_text().splitlines()]
    assert [sql for sql in references if not _accepts(tokenizer, text, sql)] == []
    for sql in ["select u.name from users u where u.id in (select user_id from orders where amount > 100) "
                "order by 1 desc limit 3;",
                "SELECT CASE WHEN price > 10 THEN 'it''s' ELSE 'no' END AS c FROM products",
                "SELECT COUNT(DISTINCT user_id) FROM orders WHERE order_date BETWEEN '2021-01-01' AND '2021-12-31'"]:
        assert _accepts(tokenizer, text, sql), sql
    for sql in ["SELECT region, COUNT(*) FROM registrations GROUP BY region;",  # no such table
                "SELECT revenue FROM orders;",  # no such column
                "SELECT name FROM users; DROP TABLE users;",  # one statement
                "SELECT COUNT(*) FROM users WHERE region = 'EU' GROUP BY COUNT(*) FROM users;"]:  # not SQL
        assert not _accepts(tokenizer, text, sql), sql


def test_odd_table_and_column_names_are_quoted_and_cannot_inject_rules(tmp_path, tokenizer):
    from skilltune.evaluate.sql_grammar import sqlite_grammar

    db = tmp_path / "odd\nstart: \"x\".db"
    table = 'a\nstart: "x"'
    con = sqlite3.connect(db)
    con.execute('CREATE TABLE "{}" ("na""me" TEXT, "b c" INT, plain INT)'.format(table.replace('"', '""')))
    con.commit()
    con.close()
    text = sqlite_grammar(db)
    assert text.count("\nstart:") == 1  # the names' line breaks stay inside quotes
    quoted = '"' + table.replace('"', '""') + '"'
    assert _accepts(tokenizer, text, f'SELECT "na""me", "b c", PLAIN FROM {quoted}')
    assert not _accepts(tokenizer, text, "x") and not _accepts(tokenizer, text, 'SELECT plain FROM "a"')


def test_sql_grammar_command(tmp_path):
    db = EXAMPLE / "data" / "analytics.db"
    before = db.read_bytes()
    code, out = cli("data", "sql-grammar", str(db))
    assert code == 0 and "TABLE: \"orders\"i | \"products\"i | \"users\"i" in out
    code, out = cli("data", "sql-grammar", str(db), "--out", str(tmp_path / "g" / "sql.lark"))
    assert code == 0 and (tmp_path / "g" / "sql.lark").read_text().startswith("// One SQLite SELECT")
    code, out = cli("data", "sql-grammar", str(db), "--out", str(db))
    assert code == 2 and "the database itself" in out
    assert db.read_bytes() == before
    code, out = cli("data", "sql-grammar", str(tmp_path / "none.db"))
    assert code == 2 and "no such database file" in out
    (tmp_path / "empty.db").write_bytes(b"")
    code, out = cli("data", "sql-grammar", str(tmp_path / "empty.db"))
    assert code == 2 and "has no tables" in out
    (tmp_path / "junk.db").write_bytes(b"not a database, just text" * 100)
    code, out = cli("data", "sql-grammar", str(tmp_path / "junk.db"))
    assert code == 2 and "not a readable SQLite database" in out


def test_the_demo_decodes_under_the_grammar_of_its_database():
    """examples/sql/sql.lark is what `skilltune data sql-grammar` writes for the demo's database (no drift)."""
    from skilltune.config import load_config
    from skilltune.evaluate.sql_grammar import sqlite_grammar

    cfg = load_config(EXAMPLE / "config.yaml")
    assert cfg.eval.response_format == "grammar"
    assert Path(cfg.eval.grammar).read_text() == sqlite_grammar(cfg.eval.db)


def test_generate_decodes_under_a_grammar(tiny_model_dir, tmp_path, tokenizer):
    """The tiny model's random weights never write SQL; under the grammar every answer is a prefix of one SELECT on
    the schema (random weights wander inside names, so it may not end within the budget)."""
    from skilltune.evaluate.sql_grammar import sqlite_grammar

    grammar = tmp_path / "sql.lark"
    grammar.write_text(sqlite_grammar(EXAMPLE / "data" / "analytics.db"))
    code, out = cli("generate", str(tiny_model_dir), "How many users?", "Revenue?", "--grammar", str(grammar),
                    "--max-new-tokens", "24", "--precision", "fp32")
    answers = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("base: ")]
    assert code == 0 and len(answers) == 2, out
    for answer in answers:
        m = _matcher(tokenizer, grammar.read_text())
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert answer.upper().startswith("SELECT") and m.try_consume_tokens(ids) == len(ids), answer
    code, out = cli("generate", str(tiny_model_dir), "How many users?", "--max-new-tokens", "24")
    assert code == 0 and "base: SELECT" not in out.upper()
    code, out = cli("generate", str(tiny_model_dir), "x", "--grammar", str(grammar), "--json")
    assert code == 2 and "give one of --json, --grammar" in out
    grammar.write_text("start: missing_rule")
    code, out = cli("generate", str(tiny_model_dir), "x", "--grammar", str(grammar))
    assert code == 2 and "not a usable Lark grammar" in out and "missing_rule" in out


def test_eval_decodes_under_eval_grammar(tmp_path, stopping_run_dir):
    """eval.response_format grammar: answers decoded under eval.grammar (the one-word model must now write the
    grammar's words); a missing or broken grammar is refused before any model loads, naming the field."""
    from helpers import write_yaml

    grammar = tmp_path / "yes.lark"
    grammar.write_text('start: "answer: " ("yes" | "no")\n')
    rows = [{"prompt": f"Say {w}.", "completion": f"answer: {w}"} for w in ("yes", "no")]
    test = write_jsonl(tmp_path / "t.jsonl", rows)
    common = ["--test", str(test), "--no-forgetting", "--metrics", "exact_match", "--set", f"data.val={test}"]
    code, out = cli("eval", str(stopping_run_dir), *common, "--set", "eval.response_format=grammar",
                    "--set", f"eval.grammar={grammar}", "--out", str(tmp_path / "shaped"))
    assert code == 0, out
    shaped = json.loads((tmp_path / "shaped" / "results.json").read_text())
    assert shaped["response_format"] == "grammar"
    answers = [json.loads(line)["tuned_output"] for line in
               (tmp_path / "shaped" / "per_example.jsonl").read_text().splitlines()]
    assert all(a in ("answer: yes", "answer: no") for a in answers), answers
    code, out = cli("eval", str(stopping_run_dir), *common, "--set", "eval.response_format=grammar")
    assert code != 0 and "eval.grammar" in out
    grammar.write_text("start: nowhere")
    code, out = cli("eval", str(stopping_run_dir), *common, "--set", "eval.response_format=grammar",
                    "--set", f"eval.grammar={grammar}")
    assert code != 0 and "not a usable Lark grammar" in out and "eval.grammar" in out
    code, out = cli("config", "validate", str(write_yaml(tmp_path / "c.yaml", {
        "data": {"train": str(test)}, "eval": {"response_format": "grammar", "grammar": str(tmp_path / "no.lark")}})),
        "--no-data")
    assert code == 2 and "eval.grammar: file not found" in out


def test_the_server_takes_vllms_structured_outputs_grammar(server):
    from openai import OpenAI

    base, _, _ = server(precision="fp32")
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    lark = 'start: "region: " ("EU" | "NA" | "APAC")\n'
    ask = {"model": "svc", "messages": [{"role": "user", "content": "Which region?"}], "max_tokens": 16}
    done = client.chat.completions.create(**ask, extra_body={"structured_outputs": {"grammar": lark}}).choices[0]
    assert done.finish_reason == "stop" and done.message.content in ("region: EU", "region: NA", "region: APAC")
    done = client.completions.create(model="svc", prompt="x", max_tokens=16,
                                     extra_body={"structured_outputs": {"grammar": lark}}).choices[0]
    assert done.text in ("region: EU", "region: NA", "region: APAC")
    body = {"model": "svc", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}
    for extra, param, needle in (
            ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs.grammar", "nowhere"),
            ({"structured_outputs": {"grammar": ""}}, "structured_outputs.grammar", "empty"),
            ({"structured_outputs": {"json": {"type": "object"}}}, "structured_outputs", "not json"),
            ({"structured_outputs": {"grammar": lark}, "response_format": {"type": "json_object"}},
             "structured_outputs", "not both"),
            ({"guided_grammar": lark}, "guided_grammar", "not supported")):
        r = httpx.post(f"{base}/v1/chat/completions", json={**body, **extra})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == param, r.text
