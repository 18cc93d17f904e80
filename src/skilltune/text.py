"""Checks on text that arrives from outside (data rows, requests, the command line)."""

from __future__ import annotations


def lone_surrogate(text: str) -> int | None:
    """Where ``text`` holds half of a UTF-16 surrogate pair, or None.

    JSON may escape one (``"\\ud800"``) and Python keeps undecodable command-line bytes as one: valid ``str``,
    but no tokenizer, database or UTF-8 file takes it.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None
