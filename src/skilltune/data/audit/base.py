"""The audit's plug-in shape: a check reads an :class:`AuditContext` and returns a :class:`CheckResult`.

Checks register with :func:`register_check` (built-ins do it the same way) and run
in registration order. A check never modifies the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from skilltune.data.reader import ReadReport
from skilltune.data.types import Example

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@dataclass
class Finding:
    where: str  # file:line (or file:line <-> file:line for pairs)
    message: str


@dataclass
class CheckResult:
    name: str
    status: str  # PASS | WARN | FAIL
    count: int
    summary: str
    findings: list[Finding] = field(default_factory=list)
    fix: str = ""
    stats: dict = field(default_factory=dict)
    skipped: bool = False  # the check could not run (no --test, no tokenizer): never evidence that it passed

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "count": self.count, "summary": self.summary,
                "fix": self.fix, "stats": self.stats, "skipped": self.skipped,
                "findings": [{"where": f.where, "message": f.message} for f in self.findings]}


@dataclass
class AuditContext:
    path: str
    report: ReadReport
    test_report: ReadReport | None = None
    tokenizer: object | None = None
    end_token: str | None = None
    max_seq_len: int = 1024
    near_dup_threshold: float = 0.85
    cache: dict = field(default_factory=dict)  # shared work between checks (signatures, token counts)

    @property
    def examples(self) -> list[Example]:
        return self.report.examples

    @property
    def kind(self) -> str:
        """What the file teaches: ``preference`` (pairs, for DPO) or ``sft`` (demonstrations)."""
        return "preference" if self.report.format == "preference" else "sft"


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    run: Callable[[AuditContext], CheckResult]
    kinds: tuple[str, ...] = ("sft", "preference")  # the data it applies to (AuditContext.kind)


CHECKS: dict[str, Check] = {}


def register_check(check: Check) -> None:
    CHECKS[check.name] = check
