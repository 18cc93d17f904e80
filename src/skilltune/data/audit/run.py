"""Run every registered check over a file and render the results."""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass, field

from skilltune.data.audit.base import CHECKS, FAIL, WARN, AuditContext, CheckResult
from skilltune.data.reader import read_file
from skilltune.paths import file_fingerprint
from skilltune.templates import render


@dataclass
class AuditReport:
    path: str
    results: list[CheckResult]
    fingerprint: dict = field(default_factory=dict)
    seconds: float = 0.0
    kind: str = "sft"  # what the file teaches (AuditContext.kind): which checks apply to it

    @property
    def errors(self) -> int:
        return sum(r.status == FAIL for r in self.results)

    @property
    def warnings(self) -> int:
        return sum(r.status == WARN for r in self.results)

    def exit_code(self, strict: bool = False) -> int:
        return 1 if self.errors or (strict and self.warnings) else 0

    def to_json(self) -> dict:
        return {"path": self.path, "kind": self.kind, "fingerprint": self.fingerprint, "errors": self.errors,
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
    results = [check.run(ctx) for check in CHECKS.values() if ctx.kind in check.kinds]
    return AuditReport(str(path), results, file_fingerprint(path, report.rows), time.perf_counter() - t0, ctx.kind)


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
    histograms = []
    if token_counts:
        for title, vals in (("prompt tokens", [p for p, _ in token_counts]),
                            ("completion tokens", [c for _, c in token_counts]),
                            ("total tokens", [p + c for p, c in token_counts])):
            histograms.append((title, _histogram_png(vals, title)))
    return render("audit_report.html", rep=rep, histograms=histograms)


def render_json(rep: AuditReport) -> str:
    return json.dumps(rep.to_json(), indent=2)
