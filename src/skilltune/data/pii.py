"""Detectors for PII and secrets, shared by the audit, `data clean --redact` and the request log.

Each detector is a regex plus an optional validator (Luhn for card numbers, mod-97 for
IBANs, octet ranges for IPs) so ordinary numbers and dates are not flagged.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable


def _luhn(s: str) -> bool:
    digits = [int(c) for c in re.sub(r"\D", "", s)]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _iban(s: str) -> bool:
    s = re.sub(r"[\s-]", "", s).upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    number = "".join(str(int(c, 36)) for c in moved)
    return int(number) % 97 == 1


def _ip(s: str) -> bool:
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return False
    return not (ip.is_unspecified or str(ip).startswith("0."))


def _ssn(s: str) -> bool:
    area, group, serial = s.split("-")
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def _ipv6(s: str) -> bool:
    # Three groups at least: "a::b" is C++ far more often than an address worth redacting.
    return sum(1 for g in s.split(":") if g) >= 3 and _ip(s)


@dataclass(frozen=True)
class Detector:
    kind: str  # placeholder name, e.g. EMAIL
    secret: bool  # secrets are errors in training data; PII is a warning
    pattern: re.Pattern
    valid: Callable[[str], bool] = lambda s: True
    group: int = 0  # the part of the match that is redacted (e.g. only the value after "password:")


# Order matters: where two detectors match the same characters, the earlier one wins, so secrets come
# first and an international phone number ("+49 151 12345678") is claimed before the card check sees it.
# Redaction is best effort (see SECURITY.md): these catch the common shapes, not every secret or name.
DETECTORS: list[Detector] = [
    Detector("PRIVATE_KEY", True, re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[\s\S]*?(?:-----END (?:[A-Z]+ )?PRIVATE KEY-----|$)")),
    Detector("AWS_KEY", True, re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    Detector("AWS_SECRET_KEY", True, re.compile(
        r"(?i)\baws_?secret(?:_access)?_?key\b[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"), group=1),
    Detector("GITHUB_TOKEN", True, re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})\b")),
    Detector("GITLAB_TOKEN", True, re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}")),
    Detector("HF_TOKEN", True, re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")),
    Detector("STRIPE_KEY", True, re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}\b")),
    Detector("GOOGLE_API_KEY", True, re.compile(r"\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])")),
    Detector("API_KEY", True, re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}\b")),
    Detector("SLACK_TOKEN", True, re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b")),
    Detector("JWT", True, re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
    Detector("BEARER_TOKEN", True, re.compile(r"(?i)\bbearer\s+([A-Za-z0-9._~+/-]{16,}=*)"), group=1),
    Detector("PASSWORD", True, re.compile(
        r"(?i)\b(?:password|passwd|pwd|passphrase|client_secret|api_?key|secret_?key)\b[\"']?\s*[:=]\s*"
        r"(?:\"([^\"\n]{3,})\"|'([^'\n]{3,})'|([^\s,;\"']{3,}))"), group=-1),
    Detector("EMAIL", False, re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[^\W_][\w-]*\.)+[^\W\d_]{2,}(?![\w-])")),
    Detector("IBAN", False, re.compile(r"(?i)\b[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]{4}){2,7}(?:[ -]?[A-Z0-9]{1,3})?\b"),
             _iban),
    Detector("SSN", False, re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])"), _ssn),
    Detector("PHONE", False, re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\w])")),
    Detector("CREDIT_CARD", False, re.compile(r"(?<![\d+])(?:\d(?:[ .-]| {2})?){12,18}\d(?!\d)"), _luhn),
    Detector("PHONE", False, re.compile(r"(?<![\w/-])(?<!\d[ .])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w/-])(?![ .]\d)")),
    Detector("IP_ADDRESS", False, re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"), _ip),
    Detector("IP_ADDRESS", False, re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"), _ipv6),
]


@dataclass
class Hit:
    kind: str
    secret: bool
    start: int
    end: int
    text: str


def find_pii(text: str) -> list[Hit]:
    """Non-overlapping hits, earlier detectors (secrets first) winning overlaps."""
    hits: list[Hit] = []
    taken: list[tuple[int, int]] = []
    for det in DETECTORS:
        for m in det.pattern.finditer(text):
            group = det.group if det.group >= 0 else next(i for i in range(m.re.groups, 0, -1) if m.group(i))
            s, e = m.span(group)
            if any(s < te and ts < e for ts, te in taken) or not det.valid(m.group(group)):
                continue
            if det.kind == "PHONE" and re.fullmatch(r"\d{4}-\d{2}-\d{2}", m.group().strip()):
                continue  # an ISO date, not a phone number
            if det.kind == "IP_ADDRESS" and re.search(r"(?:version|release|\bv)\s*$", text[max(0, s - 9):s], re.I):
                continue  # a version number such as "version 1.2.3.4"
            hits.append(Hit(det.kind, det.secret, s, e, m.group(group)))
            taken.append((s, e))
    return sorted(hits, key=lambda h: h.start)


def redact(text: str) -> tuple[str, list[Hit]]:
    """``text`` with every hit replaced by a typed placeholder like ``[EMAIL]``."""
    hits = find_pii(text)
    for h in reversed(hits):
        text = text[:h.start] + f"[{h.kind}]" + text[h.end:]
    return text, hits
