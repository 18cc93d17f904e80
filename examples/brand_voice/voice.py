"""The brand voice's rules, checked automatically: an eval metric and the scripted rater's judgement.

Northwind Cloud's voice (generate.py): a warm opening, "we" not "I", no exclamation marks,
one concrete next step, signed "— The Northwind team". ``voice`` scores an answer 0-1, the
share of the five rules it follows; use it as ``eval.metrics: [voice:voice]`` (the example's
folder on PYTHONPATH, and `--allow-code-metrics`, because it is code named by a config).
"""

from __future__ import annotations

import re

SIGNATURE = "— The Northwind team"
RULES = {
    "warm opening": lambda t: bool(re.match(r"\s*(thanks|thank you|happy to help)\b", t, re.I)),
    "no exclamation marks": lambda t: "!" not in t,
    "we, not I": lambda t: not re.search(r"\b(I|I'm|I've|I'll|I'd|me|my|mine)\b", t),
    "a concrete next step": lambda t: bool(re.search(r"\b(open|use|choose|select|go to)\b", t, re.I)),
    "signed": lambda t: t.rstrip().endswith(SIGNATURE),
}


def broken_rules(text: str) -> list[str]:
    return [name for name, follows in RULES.items() if not follows(text)]


def voice(prediction: str, reference: str = "", context: dict | None = None) -> float:
    """The share of the voice's rules ``prediction`` follows (1.0: all five)."""
    return 1 - len(broken_rules(prediction)) / len(RULES)
