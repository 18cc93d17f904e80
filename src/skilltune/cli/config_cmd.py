"""`skilltune config validate|show`: check and print a configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from skilltune.cli.common import SET_HELP, console, quiet_libraries
from skilltune.config.load import dump_config, load_config

app = typer.Typer(help="Validate and show configuration files.\n\nExample: skilltune config validate examples/sql/config.yaml",
                  no_args_is_help=True)


@app.command()
def validate(file: Path = typer.Argument(..., help="YAML config file."),
             set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
             data: bool = typer.Option(True, "--data/--no-data", help="Also read and tokenize the data, as train does "
                                                                      "before loading the model.")) -> None:
    """Validate FILE with the checks `skilltune train` runs before it loads a model; every error at once.

    Example: skilltune config validate examples/sql/config.yaml --set train.lr=1e-4
    """
    quiet_libraries()
    from skilltune.evaluate.metrics import metric_problems
    from skilltune.train.prepare import config_problems, preflight, prepare_data

    cfg = load_config(file, set_, checks=lambda c: config_problems(c) + metric_problems(c.eval))
    preflight(cfg)
    if not data:
        console.print(f"[green]OK[/green] {file} is a valid skilltune config (data not read)")
        return
    from skilltune.model.loading import load_tokenizer

    prepared = prepare_data(cfg, load_tokenizer(cfg.model)[0])
    longest = max(len(e.input_ids) for e in prepared.train)
    console.print(f"[green]OK[/green] {file}: {len(prepared.train)} training and {len(prepared.val)} validation "
                  f"examples, the longest {longest} tokens (max_seq_len {cfg.train.max_seq_len})", highlight=False,
                  soft_wrap=True)


@app.command()
def show(file: Optional[Path] = typer.Argument(None, help="YAML config file (omit for the defaults)."),
         set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Print the resolved configuration (defaults filled in, overrides applied).

    Example: skilltune config show examples/sql/config.yaml
    """
    console.print(dump_config(load_config(file, set_)), markup=False, highlight=False, end="")
