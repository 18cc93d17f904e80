"""Audit checks beyond format: duplicates, leakage, PII, length, volume, JSON targets, balance; clean/split/mix."""

import hashlib
import json

import pytest
from helpers import cli, write_jsonl

from skilltune.data.audit import audit_file
from skilltune.data.ops import clean, mix, split
from skilltune.data.pii import find_pii, redact
from skilltune.data.reader import read_file
from skilltune.errors import DataError


def _rows(n, start=0):
    topics = ["apples", "trains", "rivers", "music", "chess", "clouds", "bread", "lamps", "cats", "bridges",
              "stars", "maps", "ink", "snow", "glass", "rope", "tea", "kites", "salt", "wool"]
    return [{"prompt": f"Tell me fact number {i} about {topics[i % 20]} and {topics[(i * 7 + 3) % 20]}.",
             "completion": f"Fact {i}: {topics[(i * 3) % 20]} relate to {topics[(i * 11 + 5) % 20]} in way {i}."}
            for i in range(start, start + n)]


def _result(rep, name):
    return next(r for r in rep.results if r.name == name)


def test_exact_and_near_duplicates_and_conflicts(tmp_path):
    rows = _rows(120)
    rows.append(dict(rows[3]))  # exact duplicate
    near = dict(rows[10])
    near["completion"] = rows[10]["completion"] + " Indeed."
    rows.append(near)  # near duplicate and a conflicting completion for the same prompt
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    rep = audit_file(str(path))
    dup = _result(rep, "duplicates")
    assert dup.status == "WARN"
    assert dup.stats["exact_groups"] == 1 and dup.stats["near_pairs"] >= 1
    wheres = " ".join(f.where for f in dup.findings)
    assert "d.jsonl:4" in wheres and "d.jsonl:121" in wheres and "d.jsonl:11" in wheres and "d.jsonl:122" in wheres
    assert _result(rep, "conflicting_completions").count >= 1


def test_leakage_exact_and_near(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", _rows(120))
    leaked = _rows(1, 5)[0]
    near = dict(_rows(1, 50)[0])
    near["completion"] += " ok"
    test = write_jsonl(tmp_path / "test.jsonl", [leaked, near] + _rows(5, 500))
    rep = audit_file(str(train), str(test))
    leak = _result(rep, "leakage")
    assert leak.status == "FAIL" and leak.count == 2
    assert "test.jsonl:1" in leak.findings[0].where
    assert rep.exit_code() == 1


@pytest.mark.parametrize("text,kind", [
    ("mail me at jane.doe@example.com", "EMAIL"),
    ("call +1 415-555-0132 today", "PHONE"),
    ("card 4111 1111 1111 1111 thanks", "CREDIT_CARD"),
    ("IBAN DE89 3704 0044 0532 0130 00", "IBAN"),
    ("server 192.168.10.24 is down", "IP_ADDRESS"),
    ("key AKIAIOSFODNN7EXAMPLE", "AWS_KEY"),
    ("token sk-abcdefghijklmnopqrstuvwx1234", "API_KEY"),
    ("ghp_" + "a1B2" * 9, "GITHUB_TOKEN"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----", "PRIVATE_KEY"),
])
def test_pii_true_positives(text, kind):
    assert [h.kind for h in find_pii(text)] == [kind]


@pytest.mark.parametrize("text", [
    "The meeting is on 2024-03-15 at 10:30.", "Order 12345 costs 49.99 dollars.", "Version 1.2.3.4 shipped",
    "4111 1111 1111 1112 is not a valid card", "SELECT COUNT(*) FROM users WHERE id > 1000;",
    "In 1999, 2000 and 2001 sales grew 12%.", "Call extension 42.",
])
def test_pii_no_hit_on_ordinary_numbers_and_dates(text):
    assert find_pii(text) == []


def test_redaction_uses_typed_placeholders():
    text, hits = redact("Write to bob@corp.io or use sk-abcdefghijklmnopqrstuvwx1234.")
    assert text == "Write to [EMAIL] or use [API_KEY]."
    assert len(hits) == 2


def test_secrets_fail_and_pii_warns(tmp_path):
    rows = _rows(120)
    rows[5]["completion"] = "contact ann@example.org"
    rep = audit_file(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert _result(rep, "pii_secrets").status == "WARN"
    rows[6]["completion"] = "use AKIAIOSFODNN7EXAMPLE"
    rep = audit_file(str(write_jsonl(tmp_path / "s.jsonl", rows)))
    assert _result(rep, "pii_secrets").status == "FAIL"


def test_volume_bands(tmp_path):
    assert _result(audit_file(str(write_jsonl(tmp_path / "a.jsonl", _rows(50)))), "volume").status == "FAIL"
    assert _result(audit_file(str(write_jsonl(tmp_path / "b.jsonl", _rows(200)))), "volume").status == "WARN"
    assert _result(audit_file(str(write_jsonl(tmp_path / "c.jsonl", _rows(600)))), "volume").status == "PASS"


def test_json_targets_flag_invalid_and_odd_keys(tmp_path):
    rows = [{"prompt": f"msg {i}", "completion": json.dumps({"intent": "refund", "urgency": i % 3})}
            for i in range(120)]
    rows[7]["completion"] = '{"intent": "refund", "urgency": 1'
    rows[9]["completion"] = json.dumps({"intent": "x", "extra": 1})
    res = _result(audit_file(str(write_jsonl(tmp_path / "j.jsonl", rows))), "json_targets")
    assert res.status == "FAIL"
    text = " ".join(f"{f.where} {f.message}" for f in res.findings)
    assert "j.jsonl:8" in text and "not valid JSON" in text and "j.jsonl:10" in text and "extra" in text


def test_balance_flags_a_dominant_answer(tmp_path):
    rows = _rows(120)
    for r in rows[:60]:
        r["completion"] = "I don't know."
    assert _result(audit_file(str(write_jsonl(tmp_path / "b.jsonl", rows))), "balance").status == "WARN"


def test_length_check_uses_the_tokenizer(tmp_path, tiny_model_dir):
    from skilltune.config.schema import ModelConfig
    from skilltune.model.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig(base=str(tiny_model_dir)))[0]
    rows = _rows(120)
    rows[2]["completion"] = "word " * 400
    rep = audit_file(str(write_jsonl(tmp_path / "l.jsonl", rows)), tokenizer=tok, max_seq_len=128)
    res = _result(rep, "length")
    assert res.status == "FAIL" and res.count == 1 and "l.jsonl:3" in res.findings[0].where
    assert res.stats["total"]["max"] > 128 and res.stats["completion"]["p50"] > 0


def test_audit_formats_json_md_html(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", _rows(120))
    code, out = cli("data", "audit", str(path), "--no-tokenizer", "--format", "json")
    assert code == 0 and json.loads(out)["errors"] == 0
    code, out = cli("data", "audit", str(path), "--no-tokenizer", "--format", "md")
    assert code == 0 and "| format | PASS |" in out and "| volume | WARN |" in out
    code, _ = cli("data", "audit", str(path), "--no-tokenizer", "--format", "html", "--out", str(tmp_path / "r.html"))
    assert code == 0 and "<table>" in (tmp_path / "r.html").read_text()
    code, _ = cli("data", "audit", str(write_jsonl(tmp_path / "few.jsonl", _rows(200))), "--no-tokenizer", "--strict")
    assert code == 1  # a volume warning fails under --strict


def test_clean_drops_bad_and_duplicate_rows_with_sidecar(tmp_path):
    rows = [json.dumps(r) for r in _rows(10)] + ["{broken", json.dumps(_rows(1)[0])]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(rows) + "\n")
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    res = clean(src, tmp_path / "out.jsonl")
    assert res.kept == 10 and res.reasons == {"invalid_json": 1, "exact_duplicate": 1}
    dropped = [json.loads(x) for x in res.sidecar.read_text().splitlines()]
    assert [d["line"] for d in dropped] == [11, 12]
    assert (tmp_path / "out.jsonl").read_text().splitlines() == rows[:10]  # byte-exact copies
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    with pytest.raises(DataError, match="refusing to overwrite"):
        clean(src, src)


def test_clean_redact(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "mail a@b.com", "completion": "ok"}])
    clean(src, tmp_path / "out.jsonl", redact_pii=True)
    assert json.loads((tmp_path / "out.jsonl").read_text())["prompt"] == "mail [EMAIL]"


def test_split_is_deterministic_and_leakage_free(tmp_path):
    rows = _rows(200)
    for i in range(0, 40, 2):  # near-duplicate pairs that must not straddle splits
        rows.append({"prompt": rows[i]["prompt"], "completion": rows[i]["completion"] + " Truly."})
    src = write_jsonl(tmp_path / "all.jsonl", rows)
    a = split(src, tmp_path / "a", 0.1, 0.1, seed=3)
    b = split(src, tmp_path / "b", 0.1, 0.1, seed=3)
    assert a == b and sum(a.values()) == len(rows)
    for name in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert abs(a["test"] - 24) <= 2 and abs(a["val"] - 24) <= 2
    rep = audit_file(str(tmp_path / "a" / "train.jsonl"), str(tmp_path / "a" / "test.jsonl"))
    assert _result(rep, "leakage").count == 0


def test_mix_ratio_is_exact(tmp_path):
    skill = write_jsonl(tmp_path / "s.jsonl", _rows(92))
    general = write_jsonl(tmp_path / "g.jsonl", _rows(50, 1000))
    counts = mix(skill, general, 0.08, tmp_path / "m.jsonl")
    assert counts == {"skill": 92, "general": 8, "total": 100}
    out = read_file(tmp_path / "m.jsonl")
    assert len(out.examples) == 100 and not out.problems
    with pytest.raises(DataError, match="ratio"):
        mix(skill, general, 0.5, tmp_path / "m2.jsonl")


def test_audit_names_a_folder_or_a_missing_file_as_such(tmp_path):
    code, out = cli("data", "audit", str(tmp_path), "--no-tokenizer")
    assert code == 2 and "is a folder, not a data file" in out, out
    code, out = cli("data", "audit", str(tmp_path / "nope.jsonl"), "--no-tokenizer")
    assert code == 2 and "data file not found" in out, out


def test_rare_shapes_flags_an_intent_with_a_handful_of_rows(tmp_path):
    # four SQL intents, literals varying within each; the last has 4 rows against an even share of 40
    shapes = [("How many users in {v}?", "SELECT COUNT(*) FROM users WHERE region = '{v}';", 52),
              ("Top {n} products", "SELECT name FROM products ORDER BY price DESC LIMIT {n};", 52),
              ("Revenue in {n}?", "SELECT SUM(amount) FROM orders WHERE strftime('%Y', order_date) = '{n}';", 52),
              ("Orders of user {n}", "SELECT id FROM orders WHERE user_id = {n};", 4)]
    rows = [{"prompt": ask.format(v=f"R{i}", n=2000 + i), "completion": sql.format(v=f"R{i}", n=2000 + i)}
            for ask, sql, count in shapes for i in range(count)]
    res = _result(audit_file(str(write_jsonl(tmp_path / "s.jsonl", rows))), "rare_shapes")
    assert res.status == "WARN" and res.count == 1
    assert res.findings[0].where.endswith("s.jsonl:157") and "4 row(s)" in res.findings[0].message
    assert "user_id = 0" in res.findings[0].message and res.stats["counts"] == [4, 52, 52, 52]
    # topped up to a third of an even share (15 of 171 rows: 171 / 4 / 3 = 14.25), the warning goes
    rows += [{"prompt": f"Orders of user {n}", "completion": f"SELECT id FROM orders WHERE user_id = {n};"}
             for n in range(10, 21)]
    assert _result(audit_file(str(write_jsonl(tmp_path / "t.jsonl", rows))), "rare_shapes").status == "PASS"


def test_rare_shapes_keeps_json_keys_and_steps_aside_for_free_text(tmp_path):
    from skilltune.data.audit.checks import answer_shape

    assert answer_shape('{"intent": "refund", "order_id": "A12345", "n": 3}') == '{"intent": "", "order_id": "", "n": 0}'
    assert answer_shape('{"intent": "it\'s \\"x\\"", "order_id": null}') == '{"intent": "", "order_id": null}'
    assert answer_shape("WHERE name = 'O''Brien' AND t2.x < 10.5") == "where name = '' and t2.x < 0"
    res = _result(audit_file(str(write_jsonl(tmp_path / "f.jsonl", _rows(120)))), "rare_shapes")
    assert res.status == "PASS" and "nothing to compare" in res.summary and res.stats["shapes"] > 12
