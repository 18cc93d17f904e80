"""Evidence you can trust (issue #27): the checklist never passes on weak evidence, and every command accepts
what the others produce. Each point goes through the CLI as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import SQL_ROWS, cli, write_jsonl, write_yaml

from skilltune.registry.api import Registry


def _status(ref: str) -> dict[str, tuple[str, str]]:
    from skilltune.readiness.checklist import checklist

    return {r.item: (r.status, r.evidence) for r in checklist(ref)[1]}


@pytest.fixture(scope="module")
def sysrun(tmp_path_factory, tiny_model_dir):
    """A LoRA run trained with a system prompt and a test set; its train file has 12 rows."""
    from skilltune.config import load_config
    from skilltune.train.loop import train

    base = tmp_path_factory.mktemp("evidence")
    data = write_jsonl(base / "train.jsonl", SQL_ROWS)
    test = write_jsonl(base / "test.jsonl", SQL_ROWS[:3])
    cfg = write_yaml(base / "c.yaml", {"model": {"base": str(tiny_model_dir)},
                                       "data": {"train": str(data), "test": str(test),
                                                "system_prompt": "Answer with one SQLite query."},
                                       "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32",
                                                 "output_dir": str(base / "runs")},
                                       "eval": {"max_new_tokens": 4}})
    return train(load_config(cfg), run_name="ev").run_dir, data, test


# ---------------------------------------------------------------- 1. spot-checks recorded when finished
def test_a_spotcheck_that_was_only_shown_records_nothing(sysrun):
    run, data, _ = sysrun
    Registry().add(run, "sp")
    code, out = cli("data", "spotcheck", str(data), "--n", "3", "--reviewer", "alice")
    assert code == 0 and "nothing recorded" in out
    assert "no finished spot-check" in _status("sp@v1")["Data quality verified"][1] or \
        _status("sp@v1")["Data quality verified"][0] == "MISSING"
    from skilltune.data.records import find_spotcheck
    from skilltune.paths import file_fingerprint

    assert find_spotcheck(file_fingerprint(data)["sha256"]) is None


def test_spotcheck_interactive_and_from_a_file(sysrun, tmp_path):
    from skilltune.data.records import find_spotcheck
    from skilltune.paths import file_fingerprint

    _, data, _ = sysrun
    sha = file_fingerprint(data)["sha256"]
    env = {**os.environ}
    proc = subprocess.run([sys.executable, "-m", "skilltune.cli.main", "data", "spotcheck", str(data), "--n", "3",
                           "--reviewer", "alice", "--interactive"], input="o\nq\n", capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 1 and "nothing recorded" in proc.stdout and find_spotcheck(sha) is None
    proc = subprocess.run([sys.executable, "-m", "skilltune.cli.main", "data", "spotcheck", str(data), "--n", "3",
                           "--reviewer", "alice", "--interactive"], input="o\nf\nuses an old table name\no\n",
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    rec = find_spotcheck(sha)
    assert rec["reviewed"] == 3 and rec["reviewer"] == "alice"
    assert [f["note"] for f in rec["flagged"]] == ["uses an old table name"]
    verdicts = write_jsonl(tmp_path / "v.jsonl", [{"line": 1, "ok": True}, {"line": 2, "ok": True}])
    code, out = cli("data", "spotcheck", str(data), "--reviewer", "bob", "--record", str(verdicts))
    assert code == 0 and "2 reviewed by bob, 0 flagged" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"line": 99, "ok": True}, {"line": 1, "ok": False}])
    code, out = cli("data", "spotcheck", str(data), "--reviewer", "bob", "--record", str(bad))
    assert code == 2 and "line 99 is not an example" in out and "needs a note" in out


# ---------------------------------------------------------------- 2. a weaker audit never replaces a stronger one
def test_a_skipped_check_never_counts_and_never_replaces_one_that_ran(sysrun):
    from skilltune.data.records import find_audit
    from skilltune.paths import file_fingerprint

    run, data, test = sysrun
    Registry().add(run, "au")
    code, _ = cli("data", "audit", str(data), "--no-tokenizer")
    status, evidence = _status("au@v1")["Data quality verified"]
    assert status in ("MISSING", "FAIL") and "PASS" not in evidence
    cli("data", "audit", str(data), "--test", str(test), "--no-tokenizer")
    cli("data", "audit", str(data), "--no-tokenizer")  # weaker: no --test
    leak = {c["name"]: c for c in find_audit(file_fingerprint(data)["sha256"])["checks"]}["leakage"]
    assert not leak.get("skipped") and leak["status"] == "FAIL"  # test rows are copies of train rows here
    assert "skipped" not in leak["summary"]


def test_a_damaged_audit_record_is_no_evidence_and_the_next_audit_writes_it_again(tmp_path):
    from skilltune.data.records import find_audit
    from skilltune.paths import file_fingerprint, home

    data = write_jsonl(tmp_path / "rows.jsonl", SQL_ROWS)
    sha = file_fingerprint(data)["sha256"]
    record = home() / "evidence" / "audits" / f"{sha}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("{ half a record")
    assert find_audit(sha) is None  # the checklist then says MISSING, not a traceback
    code, out = cli("data", "audit", str(data), "--no-tokenizer")
    assert "Traceback" not in out and find_audit(sha)["checks"], out


def test_the_data_item_names_the_skipped_checks(tmp_path, sysrun):
    from skilltune.data.audit import CHECKS, CheckResult
    from skilltune.data.audit.run import AuditReport
    from skilltune.data.records import record_audit
    from skilltune.paths import file_fingerprint

    run, data, _ = sysrun
    results = [CheckResult(n, "PASS", 0, "fine") for n in CHECKS if n != "leakage"]
    results.append(CheckResult("leakage", "WARN", 0, "skipped: no --test file given", skipped=True))
    record_audit(AuditReport(str(data), results, file_fingerprint(data, 12)))
    Registry().add(run, "sk")
    status, evidence = _status("sk@v1")["Data quality verified"]
    assert status == "MISSING" and "leakage skipped" in evidence


# ---------------------------------------------------------------- 3. monitoring follows the served version
def test_monitoring_evidence_follows_a_hot_rollback(server):
    base, state, reg = server()
    assert "monitoring" in reg.get("svc@v1").metrics
    reg.promote("svc@v2")
    deadline = time.monotonic() + 30
    while state.engine.current.version != "svc@v2" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.engine.current.version == "svc@v2"
    assert "monitoring" in reg.get("svc@v2").metrics
    reg.rollback("svc")
    while state.engine.current.version != "svc@v1" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{base}/health").json()["version"] == "svc@v1"


# ---------------------------------------------------------------- 4. agreement on a few items is not "reliable"
def test_agreement_on_too_few_items_is_insufficient_and_fails_the_verdict(tmp_path):
    from fastapi.testclient import TestClient

    from skilltune.scorecard.app import create_app, csrf_for
    from skilltune.scorecard.report import study_report
    from skilltune.scorecard.study import create_study, get_study

    ev = tmp_path / "ev"
    write_jsonl(ev / "per_example.jsonl", [{"prompt": f"q{i}", "reference": "r", "base_output": "a",
                                            "tuned_output": "b"} for i in range(6)])
    study, tokens = create_study(ev, "few", ["relevance"], "rubric", 6, ["alice", "bob"], overlap=0.34)
    client = TestClient(create_app(get_study("few")[1], "few"))
    for name, tok in tokens.items():
        for _ in range(10):
            r = client.get(f"/r/{tok}", follow_redirects=False)
            if r.status_code != 303:
                break
            client.post(r.headers["location"], data={"csrf": csrf_for(study.secret, tok), "score__relevance__A": "5"})
    rep = study_report("few")
    a = rep["agreement"]["relevance"]
    assert a["items"] == 2 and a["raters"] == 2 and a["reading"].startswith("insufficient") and len(a["ci95"]) == 2
    assert rep["passed"] is False and "agreement insufficient" in rep["verdict"]
    code, out = cli("scorecard", "report", "few")
    assert code == 1 and "insufficient (2 shared items < 10)" in out


# ---------------------------------------------------------------- 5. criteria that fit the task
def test_scorecard_criteria_come_from_the_runs_config(tmp_path):
    from skilltune.scorecard.study import get_study

    ev = tmp_path / "ev"
    write_jsonl(ev / "per_example.jsonl", [{"prompt": "q", "reference": "r", "base_output": "a", "tuned_output": "b"}])
    (ev / "results.json").write_text(json.dumps({"run_dir": "", "scorecard_criteria": ["relevance", "brand_voice"]}))
    code, _ = cli("scorecard", "create", "--from", str(ev), "--name", "voice")
    assert code == 0 and [c["name"] for c in get_study("voice")[0].criteria] == ["relevance", "brand_voice"]
    (ev / "results.json").write_text(json.dumps({"run_dir": ""}))
    code, _ = cli("scorecard", "create", "--from", str(ev), "--name", "generic")
    assert [c["name"] for c in get_study("generic")[0].criteria] == ["relevance", "factual_accuracy", "safety"]


def test_examples_ask_for_criteria_that_fit():
    from skilltune.config import load_config

    root = Path(__file__).parents[1] / "examples"
    assert "brand_voice" not in load_config(root / "sql" / "config.yaml").eval.scorecard_criteria
    assert "brand_voice" in load_config(root / "brand_voice" / "config.yaml").eval.scorecard_criteria


# ---------------------------------------------------------------- 6. the forgetting recipe as written
def test_readme_forgetting_recipe_runs_as_written(tmp_path, stopping_run_dir, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = write_jsonl(tmp_path / "train.jsonl", SQL_ROWS * 3)
    cfg = write_yaml(tmp_path / "config.yaml", {"model": {"base": str(tiny_model_dir)},
                                                "data": {"train": "train.jsonl"},
                                                "train": {"max_steps": 2, "precision": "fp32"}})
    # the README's three commands; --model and --max-new-tokens only because the default model is SmolLM2
    code, out = cli("data", "replay", "general.jsonl", "--n", "200", "--model", str(stopping_run_dir),
                    "--max-new-tokens", "6")
    assert code == 0, out
    written = sum(1 for _ in open("general.jsonl"))
    assert f"wrote {written} of 200" in out and (written == 200 or "dropped" in out)
    code, out = cli("data", "mix", str(train), "general.jsonl", "train-mixed.jsonl", "--ratio", "0.08")
    assert code == 0, out
    code, out = cli("train", str(cfg), "--set", "data.train=train-mixed.jsonl")
    assert code == 0, out
    assert (tmp_path / "runs").is_dir() and any((tmp_path / "runs").glob("*/adapter"))


# ---------------------------------------------------------------- 7. column mapping in every data command
def test_every_data_command_takes_the_column_mapping(tmp_path):
    import csv

    path = tmp_path / "qa.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "answer"])
        for r in SQL_ROWS:
            w.writerow([r["prompt"], r["completion"]])
    cols = ["--column", "prompt=question", "--column", "completion=answer"]
    code, out = cli("data", "audit", str(path), "--no-tokenizer", *cols)
    assert "unknown_format" not in out and "format: PASS" in out
    code, out = cli("advise", str(path), *cols)
    assert code == 0, out
    code, out = cli("data", "clean", str(path), str(tmp_path / "clean.jsonl"), *cols)
    assert code == 0 and sum(1 for _ in open(tmp_path / "clean.jsonl")) == len(SQL_ROWS)
    assert json.loads(open(tmp_path / "clean.jsonl").readline())["messages"]
    code, out = cli("data", "split", str(path), "--out-dir", str(tmp_path / "sp"), *cols)
    assert code == 0 and (tmp_path / "sp" / "train.jsonl").is_file()
    cfg = write_yaml(tmp_path / "c.yaml", {"data": {"columns": {"prompt": "question", "completion": "answer"}}})
    code, out = cli("data", "audit", str(path), "--no-tokenizer", "--config", str(cfg))
    assert "unknown_format" not in out
    code, out = cli("data", "clean", str(path), str(tmp_path / "none.jsonl"))  # no mapping: nothing usable
    assert code == 2 and "none usable" in out and not (tmp_path / "none.jsonl").exists()


# ---------------------------------------------------------------- 8. validate = what train checks first
def test_config_validate_refuses_what_train_refuses(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"data": {"val": "missing.jsonl"}, "eval": {"metrics": ["sql_exec", "nope"]}})
    code, out = cli("config", "validate", str(cfg), "--no-data")
    assert code == 2
    for needle in ("data.train: not set", "data.val: data file not found", "unknown metric 'nope'", "sql_exec metric needs"):
        assert needle in out, out


# ---------------------------------------------------------------- 9. registry references everywhere
def test_generate_and_models_info_take_registry_references(sysrun):
    run, _, _ = sysrun
    reg = Registry()
    reg.add(run, "refs")
    reg.promote("refs@v1")
    code, out = cli("generate", "refs@production", "List all users.", "--max-new-tokens", "3")
    assert code == 0 and "user: List all users." in out and "[bold" not in out
    code, out = cli("models", "info", "refs@v1", "--json")
    assert code == 0
    facts = json.loads(out)
    assert facts["method"] == "lora" and facts["system_prompt"] == "Answer with one SQLite query."


# ---------------------------------------------------------------- 10. the store's advice works
def test_re_adding_repairs_a_damaged_store_and_duplicates_are_named(sysrun):
    from skilltune.registry.store import TamperedArtifact

    run, _, _ = sysrun
    reg = Registry()
    v = reg.add(run, "fix")
    digest = v.manifest["adapter_model.safetensors"]
    obj = reg.store.root / "objects" / digest[:2] / digest[2:]
    obj.write_bytes(b"damaged")
    with pytest.raises(TamperedArtifact):
        reg.materialize("fix@v1")
    code, out = cli("registry", "add", str(run), "--name", "fix")
    assert code == 1 and "already registered as fix@v1" in out and "repaired" in out
    assert reg.materialize("fix@v1").is_dir()  # the advice worked
    code, out = cli("registry", "add", str(run), "--name", "fix", "--allow-duplicate")
    assert code == 0 and "fix@v2" in out


# ---------------------------------------------------------------- 11. exports keep the system prompt
def test_exports_carry_the_training_system_prompt(sysrun, tmp_path):
    from transformers import AutoTokenizer

    from skilltune.serve.server import vllm_command

    run, _, _ = sysrun
    reg = Registry()
    reg.add(run, "sys")
    code, out = cli("export", "sys@v1", "--merged", str(tmp_path / "merged"))
    assert code == 0, out
    code, out = cli("export", "sys@v1", "--adapter", str(tmp_path / "adapter"))
    assert code == 0, out
    msgs = [{"role": "user", "content": "List all users."}]
    for folder in ("merged", "adapter"):
        tok = AutoTokenizer.from_pretrained(str(tmp_path / folder))
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert "Answer with one SQLite query." in text, folder
        own = tok.apply_chat_template([{"role": "system", "content": "mine"}] + msgs, tokenize=False)
        assert "mine" in own and "Answer with one SQLite query." not in own  # a caller's own system prompt wins
    assert json.loads((tmp_path / "merged" / "skilltune_export.json").read_text())["system_prompt"]
    cmd = vllm_command(reg, "sys@v1", "127.0.0.1", 8001)
    template = Path(cmd[cmd.index("--chat-template") + 1]).read_text()
    assert "Answer with one SQLite query." in template


# ---------------------------------------------------------------- 12. the small things
def test_bare_numbers_are_not_json_targets(tmp_path):
    rows = [{"prompt": f"{i} + {i}?", "completion": str(2 * i)} for i in range(150)]
    code, out = cli("data", "audit", str(write_jsonl(tmp_path / "arith.jsonl", rows)), "--no-tokenizer")
    assert "json_targets: PASS: 0/150 completions are JSON" in out


def test_near_dups_keep_rows_whose_answers_differ(tmp_path):
    rows = [{"prompt": "Show the top 3 products by revenue this year", "completion": "SELECT p FROM t LIMIT 3;"},
            {"prompt": "Show the top 5 products by revenue this year", "completion": "SELECT p FROM t LIMIT 5;"},
            {"prompt": "Show the top 5 products by revenue this year!", "completion": "SELECT p FROM t LIMIT 5;"}]
    code, out = cli("data", "clean", str(write_jsonl(tmp_path / "d.jsonl", rows)), str(tmp_path / "o.jsonl"),
                    "--near-dups", "--near-dup", "0.5")
    kept = [json.loads(x)["completion"] for x in open(tmp_path / "o.jsonl")]
    assert code == 0 and kept == ["SELECT p FROM t LIMIT 3;", "SELECT p FROM t LIMIT 5;"]


def test_short_completions_get_advice_about_short_completions(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Say word {i}.", "completion": "k"} for i in range(5)]
    code, out = cli("data", "audit", str(write_jsonl(tmp_path / "s.jsonl", rows)), "--model", str(tiny_model_dir))
    fix = [line for line in out.splitlines() if ": length: fix:" in line][0]
    assert "very short completions" in fix and "max_seq_len" not in fix


def test_every_step_is_logged_and_runs_are_named_after_the_example(tmp_path, tiny_model_dir):
    folder = tmp_path / "my_task"
    data = write_jsonl(folder / "train.jsonl", SQL_ROWS)
    cfg = write_yaml(folder / "config.yaml", {"model": {"base": str(tiny_model_dir)}, "data": {"train": str(data)},
                                              "train": {"max_steps": 7, "batch_size": 2, "precision": "fp32",
                                                        "logging_steps": 5, "output_dir": str(tmp_path / "runs")}})
    code, out = cli("train", str(cfg))
    assert code == 0, out
    [run] = (tmp_path / "runs").glob("my_task-*")
    steps = [json.loads(x)["step"] for x in open(run / "metrics.jsonl") if "train_loss" in json.loads(x)]
    assert steps == list(range(1, 8))


def test_readme_walkthrough_runs_as_written(tmp_path, tiny_model_dir, monkeypatch):
    """Every command of the README's walkthrough block, in order, as printed; only `train` gets --set flags
    that put the tiny model and two steps in place of SmolLM2 and a full epoch."""
    import re
    import shlex
    import shutil

    root = Path(__file__).parents[1]
    block = re.search(r"## Walkthrough\n\n```bash\n(.*?)```", (root / "README.md").read_text(), re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    shutil.copytree(root / "examples" / "sql", tmp_path / "examples" / "sql")
    monkeypatch.chdir(tmp_path)
    fast = ["--set", f"model.base={tiny_model_dir}", "--set", "train.max_steps=2", "--set", "train.eval_steps=2",
            "--set", "train.precision=fp32", "--set", "eval.max_new_tokens=4", "--set", "data.val=null"]
    run_dir = None
    codes = {}
    for command in commands:
        argv = shlex.split(command.replace("<timestamp>", "*"))
        assert argv[0] == "skilltune"
        argv = [str(next(Path().glob(a))) if "*" in a else a for a in argv[1:]]
        if argv[0] == "train":
            argv += fast
        code, out = cli(*argv)
        assert "Traceback" not in out, (command, out)
        codes[" ".join(argv[:2])] = code
        if argv[0] == "train":
            run_dir = next(Path("runs").glob("sql-*"))
    assert run_dir is not None and (run_dir / "eval" / "report.html").is_file()
    assert codes["advise examples/sql/data/train.jsonl"] == 0 and codes["train examples/sql/config.yaml"] == 0
    assert codes["registry add"] == 0 and codes["registry promote"] == 0
    assert codes["registry rollback"] == 1  # one version: nothing to roll back to yet, said plainly
    assert codes["checklist sql@production"] == 1  # not every item passes on a first run, and it says which
    assert codes["export sql@production"] == 0 and (tmp_path / "out" / "sql-hf" / "config.json").is_file()
