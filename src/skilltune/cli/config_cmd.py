"""`skilltune config validate|show`: check and print a configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from skilltune.cli.common import SET_HELP, console
from skilltune.config.load import dump_config, load_config

app = typer.Typer(help="Validate and show configuration files.\n\nExample: skilltune config validate examples/sql/config.yaml",
                  no_args_is_help=True)


@app.command()
def validate(file: Path = typer.Argument(..., help="YAML config file."),
             set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Validate FILE; every error is reported at once.

    Example: skilltune config validate examples/sql/config.yaml --set train.lr=1e-4
    """
    load_config(file, set_)
    console.print(f"[green]OK[/green] {file} is a valid skilltune config")


@app.command()
def show(file: Optional[Path] = typer.Argument(None, help="YAML config file (omit for the defaults)."),
         set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Print the resolved configuration (defaults filled in, overrides applied).

    Example: skilltune config show examples/sql/config.yaml
    """
    console.print(dump_config(load_config(file, set_)), markup=False, highlight=False, end="")
