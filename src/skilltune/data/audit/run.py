"""Run every registered check over a file and render the results."""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field

from skilltune.data.audit.base import CHECKS, FAIL, WARN, AuditContext, CheckResult
from skilltune.data.reader import read_file
from skilltune.paths import file_fingerprint


@dataclass
class AuditReport:
    path: str
    results: list[CheckResult]
    fingerprint: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def errors(self) -> int:
        return sum(r.status == FAIL for r in self.results)

    @property
    def warnings(self) -> int:
        return sum(r.status == WARN for r in self.results)

    def exit_code(self, strict: bool = False) -> int:
        return 1 if self.errors or (strict and self.warnings) else 0

    def to_json(self) -> dict:
        return {"path": self.path, "fingerprint": self.fingerprint, "errors": self.errors,
                "warnings": self.warnings, "seconds": round(self.seconds, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "checks": [r.to_json() for r in self.results]}


def audit_file(path: str, test: str | None = None, tokenizer=None, max_seq_len: int = 1024,
               near_dup_threshold: float = 0.85, fmt: str = "auto", columns=None) -> AuditReport:
    """Audit ``path`` (never modified) with every registered check."""
    from skilltune.model.tokenizer import turn_end_token

    t0 = time.perf_counter()
    report = read_file(path, fmt, columns)
    ctx = AuditContext(path=str(path), report=report, test_report=read_file(test, fmt, columns) if test else None,
                       tokenizer=tokenizer, end_token=turn_end_token(tokenizer) if tokenizer is not None else None,
                       max_seq_len=max_seq_len, near_dup_threshold=near_dup_threshold)
    results = [check.run(ctx) for check in CHECKS.values()]
    return AuditReport(str(path), results, file_fingerprint(path, report.rows), time.perf_counter() - t0)


def render_markdown(rep: AuditReport) -> str:
    lines = [f"# Data audit: {rep.path}", "", f"{rep.errors} error(s), {rep.warnings} warning(s).", "",
             "| check | status | count | summary |", "|---|---|---|---|"]
    for r in rep.results:
        lines.append(f"| {r.name} | {r.status} | {r.count} | {r.summary.replace('|', '/')} |")
    for r in rep.results:
        if r.findings:
            lines += ["", f"## {r.name} ({r.status})", "", f"Fix: {r.fix}", ""]
            lines += [f"- `{f.where}`: {f.message}" for f in r.findings]
    return "\n".join(lines) + "\n"


def _histogram_png(values: list[int], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.hist(values, bins=40, color="#4a7bd0")
    ax.set_title(title)
    ax.set_xlabel("tokens")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def render_html(rep: AuditReport, token_counts: list[tuple[int, int]] | None = None) -> str:
    e = html.escape
    colors = {"PASS": "#070", "WARN": "#b60", "FAIL": "#a00"}
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>skilltune data audit</title><style>"
           "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse;"
           "width:100%}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}</style></head>"
           f"<body><h1>Data audit: {e(rep.path)}</h1><p>{rep.errors} error(s), {rep.warnings} warning(s).</p>"
           "<table><tr><th>check</th><th>status</th><th>count</th><th>summary</th></tr>"]
    for r in rep.results:
        out.append(f"<tr><td>{e(r.name)}</td><td style='color:{colors[r.status]}'><b>{r.status}</b></td>"
                   f"<td>{r.count}</td><td>{e(r.summary)}</td></tr>")
    out.append("</table>")
    if token_counts:
        out.append("<h2>Token lengths</h2>")
        for title, vals in (("prompt tokens", [p for p, _ in token_counts]),
                            ("completion tokens", [c for _, c in token_counts]),
                            ("total tokens", [p + c for p, c in token_counts])):
            out.append(f"<img alt='{title}' src='data:image/png;base64,{_histogram_png(vals, title)}'>")
    for r in rep.results:
        if r.findings:
            out.append(f"<h2>{e(r.name)} ({r.status})</h2><p>Fix: {e(r.fix)}</p><ul>")
            out += [f"<li><code>{e(f.where)}</code>: {e(f.message)}</li>" for f in r.findings]
            out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def render_json(rep: AuditReport) -> str:
    return json.dumps(rep.to_json(), indent=2)
