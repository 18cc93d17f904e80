"""The `skilltune` command: one sub-command group per workflow stage.

Library code raises :class:`SkilltuneError`; here it becomes a short message and an
exit code, with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from skilltune import __version__
from skilltune.cli import (config_cmd, data_cmd, demo_cmd, eval_cmd, export_cmd, generate_cmd, models_cmd, readiness_cmd,
                           registry_cmd, scorecard_cmd, serve_cmd, train_cmd)
from skilltune.cli.common import err_console
from skilltune.errors import SkilltuneError, filesystem_problem
from skilltune.text import lone_surrogate

app = typer.Typer(
    help="skilltune — teach an open LLM a new skill: audit data, finetune, evaluate, ship with rollback.\n\n"
    "Start with: skilltune demo   (the whole workflow on the embedded SmolLM2 model)",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
# Grouped by workflow stage in --help: data -> train -> evaluate -> ship -> readiness.
app.command("demo", rich_help_panel="Start here")(demo_cmd.demo)
app.command("advise", rich_help_panel="1. Data")(readiness_cmd.advise)
app.add_typer(data_cmd.app, name="data", rich_help_panel="1. Data")
app.command("train", rich_help_panel="2. Train")(train_cmd.train)
app.command("estimate", rich_help_panel="2. Train")(readiness_cmd.estimate)
app.command("eval", rich_help_panel="3. Evaluate")(eval_cmd.eval_)
app.add_typer(scorecard_cmd.app, name="scorecard", rich_help_panel="3. Evaluate")
app.command("generate", rich_help_panel="3. Evaluate")(generate_cmd.generate)
app.add_typer(registry_cmd.app, name="registry", rich_help_panel="4. Ship")
app.command("export", rich_help_panel="4. Ship")(export_cmd.export)
app.command("push", rich_help_panel="4. Ship")(export_cmd.push)
app.command("serve", rich_help_panel="4. Ship")(serve_cmd.serve)
app.command("monitor", rich_help_panel="4. Ship")(serve_cmd.monitor)
app.command("loadtest", rich_help_panel="4. Ship")(serve_cmd.loadtest)
app.command("checklist", rich_help_panel="5. Readiness")(readiness_cmd.checklist)
app.add_typer(config_cmd.app, name="config", rich_help_panel="Setup")
app.add_typer(models_cmd.app, name="models", rich_help_panel="Setup")

def _version(value: bool) -> None:
    if value:
        print(f"skilltune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """skilltune: data -> train -> evaluate -> register -> serve -> readiness."""


# Typer vendors its own copy of click, so ``click.ClickException`` is not the class its parser raises:
# take the base class from typer's own exception hierarchy instead.
CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _undecodable(argv: list[str]) -> str | None:
    """An argument the terminal passed as bytes that are not UTF-8 (Python keeps them as lone surrogates, which
    no tokenizer, database or JSON file takes). An existing file's name may be any bytes: that one is kept."""
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if (at := lone_surrogate(value)) is not None and not os.path.lexists(value):
            shown = value.encode("utf-8", "surrogateescape")
            return f"argument {shown!r} is not UTF-8 text (byte {at}); pass text in UTF-8"
    return None


def main(argv: list[str] | None = None) -> int:
    if problem := _undecodable(sys.argv[1:] if argv is None else argv):
        err_console.print(f"[bold red]error:[/bold red] {escape(problem)}", highlight=False, soft_wrap=True)
        return 2
    try:
        rv = app(args=argv, prog_name="skilltune", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except SkilltuneError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(exc.message)}", highlight=False, soft_wrap=True)
        if exc.hint:
            err_console.print(f"[yellow]what to do:[/yellow] {escape(exc.hint)}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except CLICK_EXCEPTION as exc:  # usage errors: the usage line, the error, a "did you mean"; exit 2
        exc.show()
        return exc.exit_code
    except Exception as exc:
        problem = filesystem_problem(exc)
        if problem is None:
            raise  # our bug: keep the traceback
        err_console.print(f"[bold red]error:[/bold red] {escape(problem[0])}", highlight=False, soft_wrap=True)
        err_console.print(f"[yellow]what to do:[/yellow] {escape(problem[1])}", highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
