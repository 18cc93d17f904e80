"""`skilltune data ...`: audit, clean, split, mix and replay training data."""

from __future__ import annotations

import typer

app = typer.Typer(help="Audit, clean, split and mix training data.\n\nExample: skilltune data audit train.jsonl",
                  no_args_is_help=True)
