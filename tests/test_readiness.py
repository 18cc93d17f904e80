"""Checklist rows from evidence (with and without each piece) and exit codes; the advisor."""

import json

import pytest
from helpers import SQL_ROWS, cli, write_jsonl, write_yaml

from skilltune.readiness.advise import advise
from skilltune.readiness.checklist import checklist
from skilltune.registry.api import Registry


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir):
    from skilltune.config import load_config
    from skilltune.train.loop import train

    data = write_jsonl(tmp_path / "train.jsonl", SQL_ROWS)
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"base": str(tiny_model_dir)}, "data": {"train": str(data)},
                                          "train": {"epochs": 1, "batch_size": 4, "output_dir": str(tmp_path / "runs"),
                                                    "precision": "fp32"}})
    return train(load_config(cfg), run_name="r").run_dir


def _status(rows):
    return {r.item: r.status for r in rows}


def _fake_eval(run_dir, forgetting_flag=False, overfit_flag=False):
    results = {"primary_metric": "exact_match", "n_examples": 10, "created": "2026-11-28T12:00:00",
               "metrics": {"exact_match": {"base": 0.1, "tuned": 0.9}},
               "overfitting": {"metric": "exact_match", "val": 0.9, "test": 0.9, "gap": 0.0, "threshold": 0.1,
                               "flagged": overfit_flag, "val_loss": 0.1, "test_loss": 0.1},
               "forgetting": {"base_accuracy": 0.8, "tuned_accuracy": 0.5 if forgetting_flag else 0.8,
                              "drop": 0.3 if forgetting_flag else 0.0, "threshold": 0.1, "perplexity_ratio": 1.0,
                              "flagged": forgetting_flag, "fix": "mix general data"},
               "latency_cost": {"single_latency_p50_s": 0.1, "single_latency_p95_s": 0.2,
                                "cost_per_1000_requests": 0.01, "price_per_hour": 1.0, "device": "cpu", "threads": 2},
               "targets": [{"target": "exact_match", "threshold": 0.8, "direction": ">=", "value": 0.9,
                            "ci95": [0.85, 0.95], "n": 10, "status": "met", "judged_on": "95% interval"}]}
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "results.json").write_text(json.dumps(results))


def test_nothing_recorded_is_missing_and_exit_1(run_dir):
    reg = Registry()
    reg.add(run_dir, "x")
    _, rows = checklist("x@v1", reg)
    assert set(_status(rows).values()) == {"MISSING"}
    code, out = cli("checklist", "x@v1")
    assert code == 1 and "0/9 items pass" in out


def test_evidence_turns_rows_to_pass_and_fail(run_dir):
    from skilltune.data.audit import audit_file
    from skilltune.data.records import record_audit, record_spotcheck

    reg = Registry()
    train_file = json.loads((run_dir / "run.json").read_text())["identity"]["data"]["train"]["path"]
    rep = audit_file(train_file)
    record_audit(rep)  # 12 rows: the volume check fails
    _fake_eval(run_dir, forgetting_flag=True)
    reg.add(run_dir, "y")
    reg.add(run_dir, "y", allow_duplicate=True)
    reg.promote("y@v1")
    reg.promote("y@v2")
    st = _status(checklist("y@v2", reg)[1])
    assert st["Data quality verified"] == "FAIL"
    assert st["Catastrophic forgetting mitigated"] == "FAIL"
    assert st["Overfitting checked"] == "PASS" and st["Business targets met"] == "PASS"
    assert st["Cost and latency measured"] == "MISSING"  # single-request latency is not a load test
    assert st["Robust evaluation in place"] == "MISSING"  # no human scorecard
    assert st["Rollback plan ready"] == "MISSING"  # no dry run yet
    reg.rollback("y", dry_run=True)
    assert _status(checklist("y@v2", reg)[1])["Rollback plan ready"] == "PASS"
    record_spotcheck(train_file, "alice", [{"line": 1, "ok": True, "note": ""}, {"line": 2, "ok": True, "note": ""}])
    code, out = cli("checklist", "y@v2", "--format", "json")
    assert code == 1
    doc = json.loads(out)
    assert doc["ready"] is False and len(doc["items"]) == 9


def test_all_pass_exits_zero(run_dir, tmp_path):
    from skilltune.data.audit.run import AuditReport
    from skilltune.data.records import record_audit, record_spotcheck
    from skilltune.paths import file_fingerprint

    reg = Registry()
    train_file = json.loads((run_dir / "run.json").read_text())["identity"]["data"]["train"]["path"]
    from skilltune.data.audit import CHECKS, CheckResult

    clean = [CheckResult(name, "PASS", 0, "fine") for name in CHECKS]  # every check ran clean on that exact file
    record_audit(AuditReport(train_file, clean, file_fingerprint(train_file, 12)))
    record_spotcheck(train_file, "bob", [{"line": 1, "ok": True, "note": ""}])
    _fake_eval(run_dir)
    reg.add(run_dir, "z")
    v2 = reg.add(run_dir, "z", allow_duplicate=True)
    reg.attach_metrics("z@v2", "scorecard", {"passed": True, "verdict": "all criteria >= 4"})
    reg.attach_metrics("z@v2", "monitoring", {"request_log": True, "drift_threshold": 0.2})
    level = {"mode": "closed", "level": 4, "throughput_rps": 3.0, "error_rate": 0.0, "latency_p50_s": 0.5,
             "latency_p95_s": 0.9, "latency_p99_s": 1.0, "cost_per_1000_requests": 0.09}
    reg.attach_metrics("z@v2", "loadtest", {"levels": [level], "expected_rps": 2.0, "at_expected": level,
                                            "price_per_hour": 1.0, "created": "2026-11-30T10:00:00"})
    reg.promote("z@v1")
    reg.promote(f"z@v{v2.number}")
    reg.rollback("z", dry_run=True)
    code, out = cli("checklist", "z@production")
    assert code == 0, out
    assert "9/9 items pass" in out


def test_advisor_skill_vs_knowledge(tmp_path):
    skill = [{"prompt": f"Convert to JSON: name Ann{i}, age {20 + i % 50}",
              "completion": json.dumps({"name": f"Ann{i}", "age": 20 + i % 50})} for i in range(150)]
    a = advise(str(write_jsonl(tmp_path / "skill.jsonl", skill)))
    assert a.verdict == "finetune" and a.numbers["format_uniformity"] > 0.9

    cities = ["Lisbon", "Oslo", "Quito", "Hanoi", "Nairobi", "Lima", "Perth", "Turin", "Porto", "Bern"]
    know = [{"prompt": f"Who founded company number {i}?",
             "completion": f"It was founded in {1900 + i} by {cities[i % 10]} Merchant{i} Holdings, see "
                           f"https://example.com/c/{i}."} for i in range(150)]
    b = advise(str(write_jsonl(tmp_path / "know.jsonl", know)))
    assert b.verdict in ("rag", "both") and b.numbers["knowledge_share"] > 0.5
    code, out = cli("advise", str(tmp_path / "skill.jsonl"))
    assert code == 0 and "FINETUNE" in out


def test_scorecard_verdict_reaches_the_checklist(run_dir):
    from fastapi.testclient import TestClient

    from skilltune.scorecard.app import create_app, csrf_for
    from skilltune.scorecard.report import record, study_report
    from skilltune.scorecard.study import create_study, get_study

    reg = Registry()
    reg.add(run_dir, "sc")
    ev = run_dir / "eval"
    ev.mkdir()
    (ev / "per_example.jsonl").write_text(json.dumps({"prompt": "p", "reference": "r", "base_output": "b",
                                                      "tuned_output": "t"}) + "\n")
    (ev / "results.json").write_text(json.dumps({"run_dir": str(run_dir)}))
    study, tokens = create_study(ev, "sc-study", ["relevance"], "rubric", 5, ["ann"], 0.0)
    client = TestClient(create_app(get_study("sc-study")[1], "sc-study"))
    url = client.get(f"/r/{tokens['ann']}", follow_redirects=False).headers["location"]
    client.post(url, data={"csrf": csrf_for(study.secret, tokens["ann"]), "score__relevance__A": "5"})
    record(study_report("sc-study"))
    card = reg.get("sc@v1").metrics["scorecard"]
    assert card["passed"] is True and card["study"] == "sc-study"


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_a_complete_audit_of_either_kind_verifies_the_data(tmp_path, tiny_model_dir, kind):
    """A real audit runs the checks that apply to its data (demonstrations or preference pairs), and the
    checklist asks for exactly those: a clean audit with a spot-check passes; an audit recorded without its kind
    (older skilltune) is read the same way; a check that applies and did not run still makes it MISSING."""
    import random
    from types import SimpleNamespace

    from skilltune.config.schema import ModelConfig
    from skilltune.data.audit import audit_file
    from skilltune.data.records import record_audit, record_spotcheck
    from skilltune.model.loading import load_tokenizer
    from skilltune.paths import file_fingerprint
    from skilltune.readiness.checklist import _data

    rng = random.Random(0)
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike oscar papa".split()

    def row(i: int) -> dict:
        prompt = f"{' '.join(rng.sample(words, 6))} {i}?"
        if kind == "sft":
            return {"prompt": prompt, "completion": f"{rng.choice(words)} {i * 7}"}
        pair = [f"{rng.choice(words)} {i}", f"{' '.join(rng.sample(words, 2))} {i}"]
        rng.shuffle(pair)  # no length bias
        return {"prompt": prompt, "chosen": pair[0], "rejected": pair[1]}

    train_file = write_jsonl(tmp_path / "train.jsonl", [row(i) for i in range(150)])
    test_file = write_jsonl(tmp_path / "test.jsonl", [row(i) for i in range(1000, 1010)])
    sha = file_fingerprint(train_file)["sha256"]
    ev = SimpleNamespace(version=SimpleNamespace(lineage={"data": {"train": {"path": str(train_file), "sha256": sha}}}))
    report = audit_file(str(train_file), str(test_file), load_tokenizer(ModelConfig(base=str(tiny_model_dir)))[0])
    assert report.kind == kind and report.errors == 0, [(r.name, r.status, r.summary) for r in report.results]
    record_audit(report)
    record_spotcheck(str(train_file), "bob", [{"line": 1, "ok": True, "note": ""}])
    assert _data(ev).status == "PASS", _data(ev).evidence
    path = record_audit(report)
    doc = json.loads(path.read_text())
    assert doc["kind"] == kind
    doc.pop("kind")
    path.write_text(json.dumps(doc))
    assert _data(ev).status == "PASS", _data(ev).evidence
    doc["checks"] = [c for c in doc["checks"] if c["name"] != "duplicates"]
    path.write_text(json.dumps(doc))
    row_ = _data(ev)
    assert row_.status == "MISSING" and "duplicates not in the recorded audit" in row_.evidence
