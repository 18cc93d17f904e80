"""`skilltune demo --quick` end to end on the tiny model: every stage leaves its artifacts; twice gives v2."""

import json

from helpers import cli

from skilltune.registry.api import Registry


def test_demo_quick_end_to_end(tmp_path, tiny_model_dir):
    work = tmp_path / "work"
    args = ["demo", "--quick", "--workdir", str(work), "--set", f"model.base={tiny_model_dir}",
            "--set", "train.max_seq_len=512"]
    code, out = cli(*args)
    assert code == 0, out[-3000:]
    runs = sorted((work / "runs").glob("sql-demo-*"))
    assert len(runs) == 1
    run = runs[0]
    for f in ("adapter/adapter_model.safetensors", "summary.json", "loss.png", "eval/results.json",
              "eval/report.html", "eval/per_example.jsonl"):
        assert (run / f).exists(), f
    results = json.loads((run / "eval" / "results.json").read_text())
    assert "sql_exec" in results["metrics"] and results["forgetting"] is not None
    assert "production readiness: sql-demo@v1" in out and "Rollback plan ready" in out
    code, out = cli(*args)
    assert code == 0, out[-3000:]
    reg = Registry()
    assert [v.number for v in reg.list("sql-demo")] == [1, 2]
    assert reg.get("sql-demo@production").number == 2
    assert [e.action for e in reg.history("sql-demo")] == ["promote", "promote", "rollback-dry-run"]


def test_sql_example_data_is_what_its_generator_writes(tmp_path):
    """The demo's data: `examples/sql/generate.py` rewrites the committed files byte for byte; validation and test
    phrasings never reach training; no intent is starved (the audit's rare_shapes check passes)."""
    import importlib.util
    import re
    import subprocess
    import sys
    from pathlib import Path

    from skilltune.data.audit import audit_file

    example = Path(__file__).resolve().parents[1] / "examples" / "sql"
    subprocess.run([sys.executable, str(example / "generate.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "analytics.db"):
        assert (tmp_path / name).read_bytes() == (example / "data" / name).read_bytes(), name
    spec = importlib.util.spec_from_file_location("sql_example_generate", example / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    held_out = [re.compile(re.sub(r"\\\{[A-Za-z]+\\\}", ".+?", re.escape(phrasing)))
                for i in range(len(generate.INTENTS)) for phrasing in generate.held_out_phrasings(i)]
    assert len(held_out) == generate.HELD_OUT_PHRASINGS * len(generate.INTENTS)
    train = [json.loads(line)["prompt"] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert not [q for q in train if any(p.fullmatch(q) for p in held_out)]
    for split in ("val.jsonl", "test.jsonl"):
        asked = [json.loads(line)["prompt"] for line in (tmp_path / split).read_text().splitlines()]
        assert [q for q in asked if not any(p.fullmatch(q) for p in held_out)] == [], split
    rare = next(r for r in audit_file(str(tmp_path / "train.jsonl")).results if r.name == "rare_shapes")
    assert rare.status == "PASS" and rare.stats["shapes"] == len(generate.INTENTS), rare.summary
