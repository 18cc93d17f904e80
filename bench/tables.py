"""The markdown table a bench script prints when run on its own (bench/NOTES.md pastes them)."""

from __future__ import annotations


def print_markdown(title: str, rows: list[dict]) -> None:
    """``rows`` as a markdown table under ``title``: every key any row has is a column ("-" where a row lacks it)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print(f"\n{title}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
