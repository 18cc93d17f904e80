"""Evidence about data that later stages read: audit results and spot-checks, keyed by file hash."""

from __future__ import annotations

import json
import time
from pathlib import Path

from skilltune.paths import atomic_write_text, file_fingerprint, home


def _dir(kind: str) -> Path:
    path = home() / "evidence" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def record_audit(report) -> Path:
    data = report.to_json()
    path = _dir("audits") / f"{data['fingerprint']['sha256']}.json"
    atomic_write_text(path, json.dumps(data, indent=2))
    return path


def record_spotcheck(file: str, reviewer: str, flagged: str, lines: list[int]) -> Path:
    fp = file_fingerprint(file)
    path = _dir("spotchecks") / f"{fp['sha256']}.json"
    atomic_write_text(path, json.dumps({"file": file, "sha256": fp["sha256"], "reviewer": reviewer,
                                        "flagged": flagged, "lines": lines,
                                        "when": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    return path


def find_audit(sha256: str) -> dict | None:
    path = _dir("audits") / f"{sha256}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def find_spotcheck(sha256: str) -> dict | None:
    path = _dir("spotchecks") / f"{sha256}.json"
    return json.loads(path.read_text()) if path.is_file() else None
