"""Metrics against hand-computed values, the SQL comparison rules, reports, and the flags."""

import hashlib
import json
import sqlite3

import pytest
from helpers import SQL_ROWS, cli, write_jsonl, write_yaml

from skilltune.errors import ConfigError
from skilltune.evaluate.metrics import METRICS, resolve_metrics
from skilltune.evaluate.sql import results_match, run_query, sql_exec_score


def m(name, pred, ref, ctx=None):
    return METRICS[name].score(pred, ref, ctx or {})


def test_text_metrics_hand_computed():
    assert m("exact_match", "  SELECT 1; ", "select 1") == 1.0
    assert m("exact_match", "SELECT 2", "select 1") == 0.0
    # ROUGE-1 F1: pred {the, cat, sat}, ref {the, cat, ran}: P = R = 2/3 -> F1 = 2/3
    assert m("rouge1", "the cat sat", "the cat ran") == pytest.approx(2 / 3)
    # ROUGE-2: bigrams {the cat, cat sat} vs {the cat, cat ran}: 1/2
    assert m("rouge2", "the cat sat", "the cat ran") == pytest.approx(0.5)
    assert m("rougeL", "a b c d", "a b c d") == pytest.approx(1.0)
    assert m("bleu", "the quick brown fox jumps", "the quick brown fox jumps") == pytest.approx(1.0)
    assert m("bleu", "completely different words", "the quick brown fox jumps") < 0.1
    assert m("chrf", "abc", "abc") == pytest.approx(1.0)


def test_json_metrics_hand_computed(tmp_path):
    ref = '{"intent": "refund", "urgency": 2, "product": "phone"}'
    assert m("json_valid", '{"a": 1}', ref) == 1.0 and m("json_valid", "{a: 1}", ref) == 0.0
    assert m("json_valid", '```json\n{"a": 1}\n```', ref) == 1.0
    pred = '{"intent": "refund", "urgency": 3, "product": "phone"}'
    assert m("json_fields", pred, ref) == pytest.approx(2 / 3)
    assert m("json_keys_exact", pred, ref) == 1.0
    assert m("json_keys_exact", '{"intent": "refund"}', ref) == 0.0
    assert m("json_fields", "not json", ref) == 0.0
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "required": ["intent"],
                                  "properties": {"urgency": {"type": "integer"}}}))
    ctx = {"json_schema": str(schema)}
    assert m("json_schema", pred, ref, ctx) == 1.0
    assert m("json_schema", '{"urgency": "high"}', ref, ctx) == 0.0


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "t.db"
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE t (a INTEGER, b TEXT); INSERT INTO t VALUES (1,'x'),(2,'y'),(2,'y'),(3,'z');")
    con.commit()
    con.close()
    return path


def test_sql_order_rules(db):
    # no ORDER BY in the reference: row order is free
    assert sql_exec_score("SELECT a FROM t ORDER BY a DESC", "SELECT a FROM t", db) == 1.0
    # ORDER BY in the reference: order matters
    assert sql_exec_score("SELECT a FROM t ORDER BY a DESC", "SELECT a FROM t ORDER BY a", db) == 0.0
    assert sql_exec_score("SELECT a FROM t ORDER BY a", "SELECT a FROM t ORDER BY a", db) == 1.0
    # column order is ignored
    assert sql_exec_score("SELECT b, a FROM t", "SELECT a, b FROM t", db) == 1.0


def test_sql_duplicates_are_a_bag(db):
    assert sql_exec_score("SELECT DISTINCT a FROM t", "SELECT a FROM t", db) == 0.0
    assert results_match([(1,), (2,), (2,)], [(2,), (1,), (2,)], ordered=False)
    assert not results_match([(1,), (2,)], [(1,), (2,), (2,)], ordered=False)


def test_sql_errors_and_timeouts_are_wrong(db):
    assert sql_exec_score("SELEC a FROM t", "SELECT a FROM t", db) == 0.0
    assert sql_exec_score("SELECT nope FROM t", "SELECT a FROM t", db) == 0.0
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"
    import time

    t0 = time.time()
    assert sql_exec_score(endless, "SELECT a FROM t", db, timeout_s=0.5) == 0.0
    assert time.time() - t0 < 5


def test_destructive_sql_leaves_the_database_unchanged(db):
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    for bad in ("DROP TABLE t", "DELETE FROM t", "UPDATE t SET a = 0", "INSERT INTO t VALUES (9, 'q')",
                "SELECT 1; DROP TABLE t"):
        assert sql_exec_score(bad, "SELECT a FROM t", db) == 0.0
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert len(run_query(db, "SELECT * FROM t")) == 4


def test_sql_valid_and_unknown_metrics():
    assert m("sql_valid", "SELECT a FROM t WHERE a > 1", "") == 1.0
    assert m("sql_valid", "SELECT FROM WHERE", "") == 0.0
    with pytest.raises(ConfigError, match="unknown metric 'nope'"):
        resolve_metrics(["nope"])
    names = [x.name for x in resolve_metrics(["sql_exec", "tests.helpers:write_jsonl"], allow_code=True)]
    assert names[:2] == ["sql_exec", "sql_valid"]


def test_user_metric_from_module(tmp_path, monkeypatch):
    (tmp_path / "mymetrics.py").write_text("def length_ok(pred, ref, ctx):\n    return float(len(pred) <= len(ref))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="allow-code-metrics"):  # a config naming code is not enough
        resolve_metrics(["mymetrics:length_ok"])
    [metric] = resolve_metrics(["mymetrics:length_ok"], allow_code=True)
    assert metric.score("ab", "abc", {}) == 1.0


def test_forgetting_and_overfitting_flags():
    from skilltune.evaluate.forgetting import check, compare, load_suite
    from skilltune.evaluate.runner import overfitting_check

    assert overfitting_check("m", 0.95, 0.70, 0.1, 0.5, 0.1)["flagged"] is True
    assert overfitting_check("m", 0.80, 0.78, 0.1, 0.1, 0.1)["flagged"] is False

    suite = load_suite()
    assert len(suite) >= 60 and {s["category"] for s in suite} == {"arithmetic", "facts", "format", "refusal", "chat"}
    assert check({"check": "regex", "value": r"(?<!\d)12(?!\d)"}, "It is 12.", True)
    assert check({"check": "refusal", "value": ""}, "Sorry, I can't help with that.", True)
    assert not check({"check": "answered", "value": ""}, "blah blah", False)
    base = {"accuracy": 0.8, "by_category": {}, "perplexity": 10.0}
    assert compare(base, {"accuracy": 0.78, "by_category": {}, "perplexity": 10.5}, 0.1)["flagged"] is False
    assert compare(base, {"accuracy": 0.5, "by_category": {}, "perplexity": 10.5}, 0.1)["flagged"] is True
    assert compare(base, {"accuracy": 0.8, "by_category": {}, "perplexity": 14.0}, 0.1)["flagged"] is True
    # the average holds but arithmetic is gone: flagged
    cat_base = {"accuracy": 0.5, "by_category": {"arithmetic": 0.5, "chat": 0.3}, "perplexity": 10.0}
    cat_tuned = {"accuracy": 0.45, "by_category": {"arithmetic": 0.0, "chat": 0.8}, "perplexity": 10.0}
    res = compare(cat_base, cat_tuned, 0.1)
    assert res["flagged"] is True and res["categories_lost"] == {"arithmetic": 0.5}


def test_eval_run_writes_reports_with_side_by_side(tmp_path, tiny_model_dir):
    from skilltune.config import load_config
    from skilltune.train.loop import train

    rows = SQL_ROWS
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "val q <script>", "completion": "SELECT 1;"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "Say <script>alert(1)</script>", "completion": "hi"},
                                                  {"prompt": "Count users", "completion": "SELECT COUNT(*) FROM users;"}])
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"base": str(tiny_model_dir)},
                                          "data": {"train": str(data), "val": str(val), "test": str(test)},
                                          "train": {"epochs": 1, "batch_size": 4, "output_dir": str(tmp_path / "runs"),
                                                    "precision": "fp32"},
                                          "eval": {"metrics": ["exact_match", "rougeL"], "max_new_tokens": 8,
                                                   }})
    res = train(load_config(cfg), run_name="e")
    code, out = cli("eval", str(res.run_dir), "--no-forgetting")
    assert code == 0, out
    results = json.loads((res.run_dir / "eval" / "results.json").read_text())
    assert set(results["metrics"]) == {"exact_match", "rougeL"}
    assert set(results["overfitting"]) >= {"val", "test", "gap", "val_loss", "test_loss", "flagged"}
    assert results["latency_cost"]["cost_per_1000_requests"] > 0
    per = [json.loads(x) for x in (res.run_dir / "eval" / "per_example.jsonl").read_text().splitlines()]
    assert len(per) == 2 and {"base_output", "tuned_output", "reference", "base", "tuned"} <= set(per[0])
    page = (res.run_dir / "eval" / "report.html").read_text()
    assert "Base vs finetuned" in page and "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "| metric | base | finetuned |" in (res.run_dir / "eval" / "report.md").read_text()


@pytest.mark.slow
def test_embedded_model_eval_on_a_handful(tmp_path, embedded_model):
    from skilltune.model.generate import generate

    tok = embedded_model.tokenizer
    qs = [("What is 2 plus 3? Answer with the number only.", "5"), ("What is the capital of Italy?", "Rome"),
          ("What is the capital of Japan?", "Tokyo"), ("How many days are in a week?", "7")]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q, _ in qs]
    batched = generate(embedded_model.model, tok, prompts, max_new_tokens=24, batch_size=4)
    single = [generate(embedded_model.model, tok, [p], max_new_tokens=24)[0] for p in prompts]
    assert [b.text for b in batched] == [s.text for s in single]  # left padding does not change answers
    hits = sum(a.lower() in b.text.lower() or (a == "7" and "seven" in b.text.lower()) for (_, a), b in zip(qs, batched))
    assert hits >= 3
