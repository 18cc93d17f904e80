"""`skilltune checklist` and `skilltune advise`: is it ready for production; finetune or RAG?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from skilltune.cli.common import COLUMN_HELP, DATA_CONFIG_HELP, console, data_shape, plain

_COLOR = {"PASS": "green", "FAIL": "red", "MISSING": "yellow"}


def checklist(ref: str = typer.Argument(..., help="NAME@vN or NAME@alias."),
              fmt: str = typer.Option("table", "--format", help="table | md | html | json"),
              out: Optional[Path] = typer.Option(None, "--out", help="Write the report here."),
              strict: bool = typer.Option(False, "--strict", help="Also fail on warnings recorded with the evidence."),
              url: Optional[str] = typer.Option(None, "--registry-url")) -> int:
    """The production-readiness checklist computed from recorded evidence; exit 0 only if all items pass.

    Example: skilltune checklist sql-demo@production --format md
    """
    from skilltune.readiness.checklist import PASS, checklist as compute, render_markdown
    from skilltune.registry.api import Registry

    v, rows = compute(ref, Registry(url))
    ok = all(r.status == PASS for r in rows)
    if strict:
        audit_warn = [r for r in rows if r.item == "Data quality verified" and "warning(s)" in r.evidence
                      and "0 warning(s)" not in r.evidence]
        ok = ok and not audit_warn
    if fmt == "table" and not console.is_terminal:
        for r in rows:
            plain(f"{v.name}@v{v.number}: {r.item}: {r.status}: {r.evidence}" + (f" (fix: {r.fix})" if r.fix else ""))
        plain(f"{v.name}@v{v.number}: {sum(r.status == PASS for r in rows)}/{len(rows)} items pass")
    elif fmt == "table":
        table = Table("#", "item", "status", "evidence", "fix", title=f"production readiness: {v.name}@v{v.number}")
        for i, r in enumerate(rows, 1):
            table.add_row(str(i), r.item, f"[{_COLOR[r.status]}]{r.status}[/]", r.evidence, r.fix)
        console.print(table)
        console.print(f"{sum(r.status == PASS for r in rows)}/{len(rows)} items pass")
    else:
        if fmt == "json":
            text = json.dumps({"version": f"{v.name}@v{v.number}", "ready": ok,
                               "items": [r.__dict__ for r in rows]}, indent=2)
        elif fmt == "md":
            text = render_markdown(v, rows)
        else:
            from skilltune.templates import render

            text = render("checklist.html", version=f"{v.name}@v{v.number}", rows=rows,
                          passed=sum(r.status == PASS for r in rows))
        if out:
            from skilltune.paths import atomic_write_text

            atomic_write_text(out, text)
            console.print(f"written to {out}")
        else:
            print(text)
    return 0 if ok else 1


def advise(data: Path = typer.Argument(..., help="Training data."),
           test: Optional[Path] = typer.Option(None, "--test"),
           as_json: bool = typer.Option(False, "--json"),
           column: Optional[list[str]] = typer.Option(None, "--column", help=COLUMN_HELP),
           config: Optional[Path] = typer.Option(None, "--config", help=DATA_CONFIG_HELP)) -> None:
    """Finetune (a skill) or RAG (knowledge)? A verdict with the numbers behind it.

    Example: skilltune advise examples/sql/data/train.jsonl
    """
    from skilltune.readiness.advise import advise as run

    a = run(str(data), str(test) if test else None, *data_shape(column, config))
    if as_json:
        print(json.dumps(a.__dict__, indent=2))
        return
    console.print(f"[bold]verdict: {a.verdict.upper()}[/bold]")
    for r in a.reasons:
        console.print(f"  - {r}", highlight=False)
    console.print(f"next: {a.next_command}", highlight=False)


def estimate(model: str = typer.Option(..., "--model", help="A card name (llama-3.1-8b, qwen2.5-7b...) or a config.json."),
             method: str = typer.Option("lora", "--method", help="lora | dora | qlora | full"),
             gpu: str = typer.Option("a100-80gb", "--gpu", help="a100-40gb, a100-80gb, h100-80gb, h200, l4, a10g, t4, "
                                                                  "rtx-4090, cpu-spr-2c"),
             examples: int = typer.Option(1000, "--examples", min=1), avg_tokens: int = typer.Option(400, "--avg-tokens", min=1),
             epochs: float = typer.Option(3, "--epochs", min=0.01), r: int = typer.Option(16, "--r", min=1, help="LoRA rank."),
             batch: int = typer.Option(1, "--batch", min=1, help="Micro-batch size."),
             seq: Optional[int] = typer.Option(None, "--seq", min=1, help="Sequence length (default: --avg-tokens)."),
             price_per_hour: Optional[float] = typer.Option(None, "--price-per-hour", min=0.0),
             mfu: Optional[float] = typer.Option(None, "--mfu", min=0.01, max=1.0, help="Assumed utilisation of the GPU's peak (0-1)."),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Trainable parameters, adapter size, GPU memory breakdown, time and cost of a finetune.

    Example: skilltune estimate --model llama-3.1-8b --method qlora --gpu a100-80gb --examples 1000 --avg-tokens 400 --epochs 3 --price-per-hour 2.5
    """
    from skilltune.readiness.estimate import GIB, estimate as run, summary_lines

    e = run(model, method, gpu, examples, avg_tokens, epochs, r, batch, seq, price_per_hour, mfu)
    if as_json:
        print(json.dumps(e.__dict__, indent=2, default=str))
        return
    for line in summary_lines(e):
        console.print(line, highlight=False)
    table = Table("memory", "without checkpointing", "with gradient checkpointing")
    keys = list(dict.fromkeys(list(e.memory) + list(e.memory_gc)))
    for k in keys:
        a, b = e.memory.get(k), e.memory_gc.get(k)
        table.add_row(k, f"{a / GIB:.2f} GiB" if a is not None else "", f"{b / GIB:.2f} GiB" if b is not None else "")
    table.add_row("[bold]total", f"[bold]{sum(e.memory.values()) / GIB:.2f} GiB",
                  f"[bold]{sum(e.memory_gc.values()) / GIB:.2f} GiB")
    console.print(table)
    console.print(f"compute: {e.flops:.3g} FLOPs")
    for a in e.assumptions:
        console.print(f"  assumption: {a}", highlight=False)
