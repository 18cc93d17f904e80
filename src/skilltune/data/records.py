"""Evidence about data that later stages read: audit results and spot-checks, keyed by file hash."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from skilltune.paths import atomic_write_text, file_fingerprint, home

log = logging.getLogger(__name__)


def _dir(kind: str) -> Path:
    path = home() / "evidence" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def record_audit(report) -> Path:
    """Keep the audit evidence of a file, check by check.

    A later audit replaces a check's earlier result only if that check actually ran: an
    audit without ``--test`` (leakage skipped) never erases the leakage result of one
    that had it. Each check keeps the date of the audit it comes from.
    """
    data = report.to_json()
    path = _dir("audits") / f"{data['fingerprint']['sha256']}.json"
    old = _load(path) or {}
    before = {c["name"]: c for c in old.get("checks", [])}
    checks = []
    for check in data["checks"]:
        check["audited"] = data["created"]
        earlier = before.get(check["name"])
        checks.append(earlier if check.get("skipped") and earlier and not earlier.get("skipped") else check)
    data["checks"] = checks
    data["errors"] = sum(c["status"] == "FAIL" for c in checks)
    data["warnings"] = sum(c["status"] == "WARN" for c in checks)
    atomic_write_text(path, json.dumps(data, indent=2))
    return path


def record_spotcheck(file: str, reviewer: str, verdicts: list[dict]) -> Path:
    """Record a finished spot-check: who reviewed which rows, and what they flagged.

    ``verdicts``: one ``{"line": N, "ok": bool, "note": str}`` per reviewed example (a
    flag needs a note). Called only when the review is complete, never when rows are shown.
    """
    fp = file_fingerprint(file)
    path = _dir("spotchecks") / f"{fp['sha256']}.json"
    flagged = [{"line": v["line"], "note": v["note"]} for v in verdicts if not v["ok"]]
    atomic_write_text(path, json.dumps({"file": file, "sha256": fp["sha256"], "reviewer": reviewer,
                                        "reviewed": len(verdicts), "lines": [v["line"] for v in verdicts],
                                        "flagged": flagged, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    return path


def find_audit(sha256: str) -> dict | None:
    return _load(_dir("audits") / f"{sha256}.json")


def find_spotcheck(sha256: str) -> dict | None:
    return _load(_dir("spotchecks") / f"{sha256}.json")


def _load(path: Path) -> dict | None:
    """A record, or None when there is none — or it is damaged: damaged evidence is no evidence (the checklist
    says MISSING and the next audit writes it again), never a traceback."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s is damaged; treated as not recorded", path)
        return None
    return record if isinstance(record, dict) else None
