"""`skilltune demo`: the whole workflow on the embedded SmolLM2 model (text-to-SQL)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from skilltune.cli.common import SET_HELP, ConsoleStages, console, quiet_libraries


def demo(quick: bool = typer.Option(False, "--quick", help="A few steps on small subsets (a first look, tests)."),
         workdir: Path = typer.Option(Path("demo-work"), "--workdir", help="Where runs and reports go."),
         name: str = typer.Option("sql-demo", "--name", help="Registry name."),
         model: Optional[str] = typer.Option(None, "--model", help="Base model (default: the embedded SmolLM2; "
                                             "embedded:gemma3-270m is the second embedded model)."),
         set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Teach the embedded SmolLM2 text-to-SQL: advise, audit, train, eval, register, checklist.

    Example: skilltune demo            (about 10 minutes on a 2-core CPU)
    """
    quiet_libraries()
    from skilltune.cli.train_cmd import RichReporter
    from skilltune.demo import run_demo

    t0 = time.perf_counter()
    res = run_demo(workdir, quick, ([f"model.base={model}"] if model else []) + list(set_ or []), name,
                   stage=lambda s: console.rule(f"[bold]{s}"),
                   say=lambda m: console.print(m, highlight=False, markup=False),
                   reporter=RichReporter(), stages=ConsoleStages())
    total = time.perf_counter() - t0
    ev = res.eval_results
    table = Table("metric", "base", "finetuned", "delta", title=f"held-out test ({ev['n_examples']} questions)")
    for k, m in ev["metrics"].items():
        table.add_row(k, f"{m['base']:.1%}", f"{m['tuned']:.1%}", f"{m['delta']:+.1%}")
    console.print(table)
    ck = Table("item", "status", "evidence", title=f"production readiness: {res.version}")
    for r in res.checklist:
        color = {"PASS": "green", "FAIL": "red", "MISSING": "yellow"}[r.status]
        ck.add_row(r.item, f"[{color}]{r.status}[/]", r.evidence)
    console.print(ck)
    console.print("stage times (s): " + ", ".join(f"{k} {v}" for k, v in res.stage_seconds.items())
                  + f"; total {total:.0f} s", highlight=False)
    console.print(f"report: {res.report}\nrun:    {res.run_dir}\n\nnext:\n"
                  f"  skilltune serve {res.version.split('@')[0]}@production\n"
                  f"  skilltune scorecard create --from {res.run_dir / 'eval'} --name {res.version.replace('@', '-')}"
                  f" --raters alice,bob --sample 30\n"
                  f"  skilltune registry show {res.version}\n"
                  f"  skilltune checklist {res.version}\n"
                  f"  skilltune registry rollback {res.version.split('@')[0]} --dry-run\n"
                  f"  skilltune export {res.version} --format ollama --out sql-ollama\n"
                  f"  skilltune generate {res.run_dir} \"How many users are in Europe?\"", highlight=False)
