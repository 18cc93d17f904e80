"""`skilltune checklist NAME@vN`: the production-readiness checklist, filled in from evidence.

Each item is a small registered function that looks for what was actually recorded
(audits and spot-checks keyed by the training data's sha256, eval results, the
registry's alias history) and returns PASS, FAIL or MISSING with the evidence and
the command that would fix it. Exit code 0 only when every item passes, so the
command can gate a deployment in CI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from skilltune.data.audit import CHECKS
from skilltune.data.records import find_audit, find_spotcheck
from skilltune.registry.api import Registry
from skilltune.registry.db import Version

PASS, FAIL, MISSING = "PASS", "FAIL", "MISSING"


@dataclass
class Row:
    item: str
    status: str
    evidence: str
    fix: str = ""


@dataclass
class Evidence:
    version: Version
    registry: Registry
    eval: dict | None


ITEMS: list[tuple[str, Callable[[Evidence], Row]]] = []


def item(name: str):
    def deco(fn):
        ITEMS.append((name, fn))
        return fn
    return deco


def _eval_results(v: Version) -> dict | None:
    """Eval results attached at registration, else the run's eval folder (evaluated after registering)."""
    if (v.metrics or {}).get("eval"):
        return v.metrics["eval"]
    path = Path(v.lineage.get("run_dir", "")) / "eval" / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _applicable(audit: dict) -> list[str]:
    """The checks an audit of this data must have run: those for its kind (demonstrations or preference pairs).
    An audit recorded without its kind (older skilltune) is of the kind every check it ran applies to."""
    ran = [CHECKS[c["name"]] for c in audit["checks"] if c["name"] in CHECKS]
    kind = audit.get("kind") or next((k for k in ("sft", "preference") if all(k in c.kinds for c in ran)), "sft")
    return [name for name, check in CHECKS.items() if kind in check.kinds]


@item("Data quality verified")
def _data(ev: Evidence) -> Row:
    """Every audit check ran (none skipped) without errors on the exact training file, and a person reviewed it."""
    train = ev.version.lineage["data"]["train"]
    audit, spot = find_audit(train["sha256"]), find_spotcheck(train["sha256"])
    name = "Data quality verified"
    fix_audit = f"skilltune data audit {train['path']} --test TEST.jsonl"
    if audit is None:
        return Row(name, MISSING, f"no audit of the exact training data (sha256 {train['sha256'][:12]})", fix_audit)
    checks = audit["checks"]
    failed = [c for c in checks if c["status"] == "FAIL"]
    ran = {c["name"] for c in checks}
    skipped = [c for c in checks if c.get("skipped")] + [
        {"name": name, "summary": "not in the recorded audit"} for name in _applicable(audit) if name not in ran]
    where = f"audit of {train['path']} ({', '.join(sorted({c.get('audited', audit['created']) for c in checks}))})"
    if failed:
        return Row(name, FAIL, f"{where}: {', '.join(c['name'] + ' FAIL' for c in failed)}",
                   f"{fix_audit}  (then clean and retrain)")
    if skipped:
        return Row(name, MISSING, f"{where}: not every check ran ({'; '.join(c['name'] + ' ' + c['summary'] for c in skipped)})",
                   fix_audit)
    warned = [c["name"] for c in checks if c["status"] == "WARN"]
    clean = f"{where}: {len(checks)} checks ran, 0 errors" + (f", warnings: {', '.join(warned)}" if warned else "")
    fix_spot = f"skilltune data spotcheck {train['path']} --n 20 --reviewer YOU"
    if spot is None or not spot.get("reviewed"):
        return Row(name, MISSING, f"{clean}; no finished spot-check recorded", fix_spot)
    flagged = spot.get("flagged") or []
    review = f"spot-check by {spot['reviewer']} on {spot['when']}: {spot['reviewed']} examples reviewed"
    if flagged:
        notes = "; ".join(f"line {f['line']}: {f['note']}" for f in flagged[:5])
        return Row(name, FAIL, f"{clean}; {review}, {len(flagged)} flagged ({notes})",
                   f"fix the flagged rows, then audit and spot-check again: {fix_spot}")
    return Row(name, PASS, f"{clean}; {review}, none flagged")


@item("Robust evaluation in place")
def _evaluation(ev: Evidence) -> Row:
    name = "Robust evaluation in place"
    if ev.eval is None:
        return Row(name, MISSING, "no automated evaluation on a held-out test set",
                   f"skilltune eval {ev.version.lineage.get('run_dir')} --test TEST.jsonl")
    prim = ev.eval["primary_metric"]
    m = ev.eval["metrics"][prim]
    auto = (f"{prim} {m['base']:.3f} -> {m['tuned']:.3f} on {ev.eval['n_examples']} held-out examples "
            f"({ev.eval['created']})")
    card = (ev.version.metrics or {}).get("scorecard")
    if card is None:
        return Row(name, MISSING, auto + "; no human scorecard study recorded",
                   "have people rate base vs tuned outputs (blind A/B, 1-5 per criterion) and record the verdict")
    if not card.get("passed"):
        return Row(name, FAIL, auto + f"; human scorecard verdict: {card.get('verdict')}", "fix the failures found")
    return Row(name, PASS, auto + f"; human scorecard passed ({card.get('verdict')})")


@item("Catastrophic forgetting mitigated")
def _forgetting(ev: Evidence) -> Row:
    name = "Catastrophic forgetting mitigated"
    f = (ev.eval or {}).get("forgetting")
    if not f:
        return Row(name, MISSING, "the forgetting check has not run",
                   f"skilltune eval {ev.version.lineage.get('run_dir')} --forgetting")
    text = (f"general suite {f['base_accuracy']:.2f} -> {f['tuned_accuracy']:.2f} (drop {f['drop']:+.2f}, "
            f"threshold {f['threshold']}); perplexity x{f['perplexity_ratio']:.2f}"
            + (f"; lost: {f['categories_lost']}" if f.get("categories_lost") else ""))
    return Row(name, FAIL if f["flagged"] else PASS, text, f["fix"] if f["flagged"] else "")


@item("Overfitting checked")
def _overfit(ev: Evidence) -> Row:
    name = "Overfitting checked"
    o = (ev.eval or {}).get("overfitting")
    if not o:
        return Row(name, MISSING, "no validation-vs-test comparison recorded",
                   "train with a validation set (data.val) and run skilltune eval on the run directory")
    text = f"{o['metric']} val {o['val']:.3f} vs test {o['test']:.3f} (gap {o['gap']:+.3f}, threshold {o['threshold']})"
    return Row(name, FAIL if o["flagged"] else PASS, text,
               "more data, fewer epochs or early stopping (train.early_stopping_patience)" if o["flagged"] else "")


@item("Business targets met")
def _targets(ev: Evidence) -> Row:
    """Every eval.targets threshold met on its 95% interval (never on a point estimate that could be luck)."""
    name = "Business targets met"
    targets = (ev.eval or {}).get("targets")
    if not targets:
        return Row(name, MISSING, "no business target is set for this version's evaluation",
                   "set eval.targets in the config (e.g. sql_exec: 0.9, latency_p95_s: 2.5) and run skilltune eval "
                   f"{v_ref(ev)}")
    def show(t):
        value = f"{t['value']:.3f}" if isinstance(t.get("value"), float) else str(t.get("value"))
        ci = f" (95% CI {t['ci95'][0]:.3f}-{t['ci95'][1]:.3f})" if "ci95" in t else ""
        return f"{t['target']} {t['direction']} {t['threshold']}: {t['status']} at {value}{ci}"
    text = "; ".join(show(t) for t in targets)
    if any(t["status"] == "not met" for t in targets):
        return Row(name, FAIL, text, "improve the model or the data until the target is met")
    undecided = [t for t in targets if t["status"] != "met"]
    if undecided:
        return Row(name, MISSING, text, "; ".join(t.get("note", "") for t in undecided) or "more test examples")
    return Row(name, PASS, text)


@item("Cost and latency measured")
def _cost(ev: Evidence) -> Row:
    """A load test that carried the expected load with <= 1% errors (single-request latency is not "under load")."""
    name = "Cost and latency measured"
    lc = (ev.eval or {}).get("latency_cost")
    single = (f"single request p50 {lc['single_latency_p50_s']:.2f} s / p95 {lc['single_latency_p95_s']:.2f} s"
              if lc else "no single-request latency")
    lt = (ev.version.metrics or {}).get("loadtest")
    fix = f"skilltune loadtest {v_ref(ev)} --concurrency 1,4,16 --expected-rps RPS"
    if not lt:
        return Row(name, MISSING, f"{single}; no load test recorded (latency under load unknown)", fix)
    if not lt.get("expected_rps"):
        return Row(name, MISSING, f"load test of {lt['created']} ran without an expected load to judge",
                   fix + "   (or set serve.expected_rps)")
    best = lt.get("at_expected")
    if not best:
        top = max(lt["levels"], key=lambda lv: lv["throughput_rps"])
        return Row(name, FAIL, f"load test of {lt['created']}: at most {top['throughput_rps']:.2f} req/s "
                   f"({top['mode']} {top['level']:g}, errors {top['error_rate']:.1%}) against the expected "
                   f"{lt['expected_rps']:g} req/s", "more replicas or a faster engine (GPU, vLLM), then test again")
    return Row(name, PASS, f"load test of {lt['created']}: {best['throughput_rps']:.2f} req/s >= expected "
               f"{lt['expected_rps']:g} ({best['mode']} {best['level']:g}), p50 {best['latency_p50_s']} s, p95 "
               f"{best['latency_p95_s']} s, p99 {best['latency_p99_s']} s, errors {best['error_rate']:.1%}; "
               f"${best['cost_per_1000_requests']} per 1,000 requests at ${lt['price_per_hour']}/h")


@item("Monitoring and logging configured")
def _monitoring(ev: Evidence) -> Row:
    name = "Monitoring and logging configured"
    mon = (ev.version.metrics or {}).get("monitoring")
    if not mon:
        return Row(name, MISSING, "no serving deployment with request logging and a drift threshold is recorded",
                   f"skilltune serve {v_ref(ev)}   (request log + drift threshold; then skilltune monitor "
                   f"{ev.version.name})")
    if not mon.get("request_log") or not mon.get("drift_threshold"):
        return Row(name, FAIL, f"served since {mon.get('since')} with request logging "
                   f"{'on' if mon.get('request_log') else 'OFF'}, drift threshold {mon.get('drift_threshold')}",
                   f"skilltune serve {v_ref(ev)} (request logging is on by default)")
    return Row(name, PASS, f"served since {mon.get('since')} with request logging on (PII redaction "
               f"{'on' if mon.get('redact_pii') else 'off'}), drift threshold {mon['drift_threshold']}; "
               f"`skilltune monitor {ev.version.name}` summarises it")


@item("Exports behave as trained")
def _exports(ev: Evidence) -> Row:
    """Every export kept passed its train-to-serve parity check (template, stop token, answers)."""
    name = "Exports behave as trained"
    kept = {k: r for k, r in ((ev.version.metrics or {}).get("exports") or {}).items() if r.get("out")}
    fix = f"skilltune export {v_ref(ev)} --format hf|gguf|ollama --out DIR   (checks parity)"
    if not kept:
        if (ev.version.metrics or {}).get("monitoring"):
            return Row(name, PASS, "served by skilltune serve from the registry itself (no export to check)")
        return Row(name, MISSING, "no export with a parity check is recorded, and no skilltune serve deployment",
                   fix)
    forced = [k for k, r in kept.items() if r.get("forced")]
    unchecked = [k for k, r in kept.items() if not r.get("checked")]
    if forced:
        return Row(name, FAIL, f"kept despite a failed parity check (--force): {', '.join(forced)}",
                   "fix the export (the check says what differs) and export again")
    if unchecked:
        return Row(name, MISSING, f"exported without a parity check (--no-check): {', '.join(unchecked)}", fix)
    return Row(name, PASS, "; ".join(f"{k}: {export_summary(r)}" for k, r in kept.items()))


def export_summary(record: dict) -> str:
    """One line for an export record (registry show, the checklist)."""
    parity = record.get("parity")
    if not parity:
        return f"{record.get('created')}: unchecked -> {record.get('out')}"
    t, o = parity["template"], parity.get("output")
    text = (f"{record.get('created')}: parity {'ok' if parity['ok'] else 'FAILED'} (template {t['identical']}/{t['n']}, "
            f"stop {'ok' if parity['stop']['ok'] else 'FAILED'}")
    if o:
        text += f", answers {o['identical']}/{o['n']} identical, {o['metric']} cost {o['cost_points']:+.1f} points"
    return text + f") -> {record.get('out') or 'not kept'}"


def v_ref(ev: Evidence) -> str:
    return f"{ev.version.name}@v{ev.version.number}"


@item("Rollback plan ready")
def _rollback(ev: Evidence) -> Row:
    name = "Rollback plan ready"
    v = ev.version
    aliases = [a for a, n in ev.registry.aliases(v.name).items() if n == v.number]
    if not aliases:
        return Row(name, MISSING, f"{v.name}@v{v.number} is not behind any alias",
                   f"skilltune registry promote {v.name}@v{v.number} --alias production")
    alias = "production" if "production" in aliases else aliases[0]
    events = ev.registry.history(v.name, alias)
    promotes = [e for e in events if e.action == "promote"]
    last_promote = max((e.id for e in promotes if e.to_number == v.number), default=None)
    dry = [e for e in events if e.action == "rollback-dry-run" and last_promote is not None and e.id > last_promote
           and e.from_number == v.number]
    earlier = [e for e in promotes if e.to_number != v.number]
    if not earlier:
        return Row(name, MISSING, f"{v.name}@{alias} has no previous version to roll back to",
                   "keep the previous production version registered; promote this one over it")
    if not dry:
        return Row(name, MISSING, f"previous version v{earlier[-1].to_number} exists; no rollback dry-run recorded "
                   "since this version was promoted", f"skilltune registry rollback {v.name} --alias {alias} --dry-run")
    return Row(name, PASS, f"rollback dry-run {dry[-1].when:%Y-%m-%d %H:%M}: v{dry[-1].from_number} -> "
               f"v{dry[-1].to_number} ({alias})")


def checklist(ref: str, registry: Registry | None = None) -> tuple[Version, list[Row]]:
    reg = registry or Registry()
    v = reg.get(ref)
    ev = Evidence(v, reg, _eval_results(v))
    return v, [fn(ev) for _, fn in ITEMS]


def render_markdown(v: Version, rows: list[Row]) -> str:
    lines = [f"# Production readiness: {v.name}@v{v.number}", "", "| # | item | status | evidence | fix |",
             "|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r.item} | {r.status} | {r.evidence.replace('|', '/')} | {r.fix.replace('|', '/')} |")
    passed = sum(r.status == PASS for r in rows)
    return "\n".join(lines) + f"\n\n{passed}/{len(rows)} items pass.\n"
