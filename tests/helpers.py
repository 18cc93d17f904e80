"""Small helpers shared by tests: writing JSONL, running the CLI in-process."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str) -> tuple[int, str]:
    """Run ``skilltune ARGS`` in-process; return (exit code, stdout+stderr)."""
    import io

    from rich.console import Console

    from skilltune.cli import common
    from skilltune.cli.main import main

    buf = io.StringIO()
    old_out, old_err = common.console.file, common.err_console.file
    common.console.file = common.err_console.file = buf
    common.console.width = common.err_console.width = 250
    try:
        import contextlib

        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            code = main(list(args))
    finally:
        common.console.file, common.err_console.file = old_out, old_err
    del Console
    return code, buf.getvalue()


SQL_ROWS = [
    {"prompt": "List all users.", "completion": "SELECT name FROM users;"},
    {"prompt": "Count the orders.", "completion": "SELECT COUNT(*) FROM orders;"},
    {"prompt": "Users in the EU?", "completion": "SELECT name FROM users WHERE region = 'EU';"},
    {"prompt": "Top 5 products.", "completion": "SELECT product_id FROM orders GROUP BY product_id LIMIT 5;"},
    {"prompt": "Hello there.", "completion": "Hello! How can I help?"},
    {"prompt": "What is the answer?", "completion": "42"},
    {"prompt": "The quick brown fox.", "completion": "jumps over the lazy dog"},
    {"prompt": "Name the users by region.", "completion": "SELECT region, name FROM users ORDER BY region;"},
    {"prompt": "How many users?", "completion": "SELECT COUNT(*) FROM users;"},
    {"prompt": "Orders per product.", "completion": "SELECT product_id, COUNT(*) FROM orders GROUP BY product_id;"},
    {"prompt": "Say hi.", "completion": "hi"},
    {"prompt": "Revenue total.", "completion": "SELECT SUM(amount) FROM orders;"},
]


def encode_rows(tokenizer, rows, system: str | None = None, train_on_inputs: bool = False):
    """Encoded training examples from prompt/completion dicts (optionally with a system prompt)."""
    from skilltune.data.tokenize import encode_example
    from skilltune.data.types import Example, Turn
    from skilltune.model.tokenizer import turn_end_token

    head = [Turn("system", system)] if system else []
    return [encode_example(tokenizer, Example(head + [Turn("user", r["prompt"]), Turn("assistant", r["completion"], True)]),
                           turn_end_token(tokenizer), train_on_inputs) for r in rows]
