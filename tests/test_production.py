"""The production loop (issue #19): business targets judged on intervals, a release gate against production,
a recorded load test the checklist reads, and a monitor that sees error spikes. Through the CLI and a real
server, on the tiny model."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from helpers import SQL_ROWS, cli, write_jsonl, write_yaml

from skilltune.registry.api import Registry


@pytest.fixture(scope="module")
def prod_run(tmp_path_factory, tiny_model_dir):
    from skilltune.config import load_config
    from skilltune.train.loop import train

    base = tmp_path_factory.mktemp("prod")
    data = write_jsonl(base / "train.jsonl", SQL_ROWS)
    test = write_jsonl(base / "test.jsonl", SQL_ROWS[:6])
    cfg = write_yaml(base / "c.yaml", {"model": {"base": str(tiny_model_dir)},
                                       "data": {"train": str(data), "test": str(test)},
                                       "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32",
                                                 "output_dir": str(base / "runs")},
                                       "eval": {"max_new_tokens": 4}, "serve": {"expected_rps": 0.5}})
    return train(load_config(cfg), run_name="prod").run_dir, test


# ---------------------------------------------------------------- 1. targets
def test_targets_are_judged_on_the_interval():
    from skilltune.evaluate.targets import judge_metric

    assert judge_metric("m", 0.5, [1.0] * 90 + [0.0] * 10, True)["status"] == "met"
    assert judge_metric("m", 0.95, [1.0] * 10 + [0.0] * 90, True)["status"] == "not met"
    close = judge_metric("m", 0.88, [1.0] * 89 + [0.0] * 11, True)  # 89% on 100 does not "meet" 88%
    assert close["status"] == "undecided" and close["more_examples_needed"] > 100
    assert "more test examples would decide it" in close["note"]
    assert judge_metric("lat", 2.0, [1.0, 1.2, 1.1] * 20, False)["status"] == "met"


def test_eval_reports_targets_and_refuses_unknown_ones(prod_run, tmp_path):
    run, test = prod_run
    code, out = cli("eval", str(run), "--no-forgetting", "--out", str(tmp_path / "e"),
                    "--set", "eval.targets={exact_match: 0.99, latency_p95_s: 60}")
    assert code == 0, out
    lines = [x for x in out.splitlines() if x.startswith("target: ")]
    assert lines[0].startswith("target: exact_match >= 0.99: NOT MET") or "UNDECIDED" in lines[0]
    assert lines[1].startswith("target: latency_p95_s <= 60.0: MET")
    code, out = cli("eval", str(run), "--no-forgetting", "--out", str(tmp_path / "e2"), "--set",
                    "eval.targets={rouge_nope: 0.5}")
    assert code == 1 and "rouge_nope" in out and "does not measure" in out


# ---------------------------------------------------------------- 2. the release gate
def test_a_candidate_is_gated_against_production_and_promote_respects_it(prod_run, tmp_path):
    run, _ = prod_run
    reg = Registry()
    reg.add(run, "cand")
    reg.promote("cand@v1", reason="first")
    reg.add(run, "cand", allow_duplicate=True)
    # the same weights against production: no significant difference -> the gate passes
    code, out = cli("eval", "cand@v2", "--against", "cand@production", "--no-forgetting", "--out", str(tmp_path / "a"))
    assert code == 0 and "gate against cand@v1: PASS" in out, out
    assert reg.get("cand@v2").metrics["eval"]["gate"]["passed"] is True
    # a target it cannot meet fails the gate, and promote refuses it
    code, out = cli("eval", "cand@v2", "--against", "cand@production", "--no-forgetting", "--out", str(tmp_path / "b"),
                    "--set", "eval.targets={exact_match: 0.999}")
    assert code == 0 and "gate against cand@v1: FAIL" in out
    code, out = cli("registry", "promote", "cand@v2")
    assert code == 1 and "failed its release gate" in out and "--force --reason" in out
    assert reg.get("cand@production").number == 1
    code, out = cli("registry", "promote", "cand@v2", "--force")  # --force without a reason is not enough
    assert code == 1
    code, out = cli("registry", "promote", "cand@v2", "--force", "--reason", "hotfix for a customer")
    assert code == 0 and reg.get("cand@production").number == 2
    last = reg.history("cand")[-1]
    assert "hotfix for a customer" in last.reason and "forced past a failed gate against cand@v1" in last.reason


def test_a_separate_baseline_is_freed_before_the_finetuned_model_answers(prod_run, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    """--baseline/--against load a second model; it must be gone before the candidate runs (one model's memory)."""
    import weakref

    from skilltune.evaluate import runner

    run, _ = prod_run
    loaded, seen = [], []
    real_load, real_generate = runner.load_target, runner.generate

    def load_target(spec, *args, **kwargs):
        target = real_load(spec, *args, **kwargs)
        if spec == str(tiny_model_dir):
            loaded.append(weakref.ref(target.model))
        return target

    def generate(model, *args, **kwargs):
        seen.append((model is loaded[0](), loaded[0]() is not None))
        return real_generate(model, *args, **kwargs)

    monkeypatch.setattr(runner, "load_target", load_target)
    monkeypatch.setattr(runner, "generate", generate)
    code, out = cli("eval", str(run), "--baseline", str(tiny_model_dir), "--no-forgetting", "--out", str(tmp_path / "e"))
    assert code == 0, out
    assert len(loaded) == 1 and seen[0] == (True, True)  # the baseline answered first, with its own model
    assert len(seen) > 1 and all(not alive for _, alive in seen[1:])  # then it was gone


# ---------------------------------------------------------------- 3. the load test
def test_a_load_test_is_recorded_and_read_by_the_checklist(prod_run, tmp_path):
    from skilltune.readiness.checklist import checklist

    run, _ = prod_run
    reg = Registry()
    reg.add(run, "lt")
    status = {r.item: r for r in checklist("lt@v1", reg)[1]}["Cost and latency measured"]
    assert status.status == "MISSING" and "no load test" in status.evidence
    code, out = cli("loadtest", "lt@v1", "--concurrency", "1,4,16", "--duration", "1", "--rate", "4",
                    "--max-tokens", "4", "--out", str(tmp_path / "lt.json"), "--plot", str(tmp_path / "lt.png"))
    assert code == 0, out
    doc = json.loads((tmp_path / "lt.json").read_text())
    assert [(lv["mode"], lv["level"]) for lv in doc["levels"]] == [("closed", 1), ("closed", 4), ("closed", 16),
                                                                   ("open", 4.0)]
    for lv in doc["levels"]:
        assert lv["ok"] > 0 and lv["error_rate"] == 0.0 and lv["latency_p95_s"] >= lv["latency_p50_s"] > 0
        assert lv["cost_per_1000_requests"] > 0
    assert any(lv["ttft_p50_s"] for lv in doc["levels"])  # every 4th request streams
    assert (tmp_path / "lt.png").read_bytes()[:4] == b"\x89PNG"
    recorded = reg.get("lt@v1").metrics["loadtest"]
    assert recorded["expected_rps"] == 0.5 and recorded["meets_expected"] is True  # from the run's serve.expected_rps
    row = {r.item: r for r in checklist("lt@v1", reg)[1]}["Cost and latency measured"]
    assert row.status == "PASS" and "req/s >= expected 0.5" in row.evidence and "p95" in row.evidence
    assert "monitoring" not in reg.get("lt@v1").metrics  # a load test's own server is not a deployment


# ---------------------------------------------------------------- 4. a monitor that sees failures
@pytest.mark.usefixtures("db_backend")
def test_a_run_of_bad_requests_is_an_error_spike(prod_run, tmp_path):
    from skilltune.config.schema import ServeConfig
    from skilltune.serve.server import build_state, make_server

    run, _ = prod_run
    reg = Registry()
    reg.add(run, "mon")
    reg.promote("mon@v1")
    state = build_state("mon@production", ServeConfig(), None, reg)
    port = 18000 + int(time.time()) % 1000
    srv = make_server(state, "127.0.0.1", port)
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(8):
            assert httpx.post(f"{base}/v1/completions", json={"model": "mon", "prompt": "x", "max_tokens": 2}).status_code == 200
        code, out = cli("monitor", "mon", "--window", "1", "--check")
        assert code == 0 and "mon: no alerts" in out, out
        time.sleep(1.1)
        for _ in range(8):
            assert httpx.post(f"{base}/v1/completions", json={"model": "mon"}).status_code == 422
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        state.stop()
    code, out = cli("monitor", "mon", "--window", "1", "--check")
    assert code == 1 and "ALERT mon: error spike: 8 errors" in out and "'4xx': 8" in out, out
    assert "4xx 8" in out and "error rate 50.0%" in out
    code, _ = cli("monitor", "mon", "--window", "1")  # without --check it reports and exits 0
    assert code == 0
