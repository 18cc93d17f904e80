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
