"""`skilltune registry ...`: versions, aliases, rollback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from skilltune.cli.common import console, human_bytes, plain

app = typer.Typer(help="Versions with lineage, promote and one-command rollback.\n\n"
                       "Example: skilltune registry rollback sql-demo", no_args_is_help=True)
URL_HELP = "Registry database URL (default: SQLite in the skilltune home; or $SKILLTUNE_REGISTRY_URL)."


def _reg(url: Optional[str]):
    from skilltune.registry.api import Registry

    return Registry(url)


@app.command()
def add(run_dir: Path = typer.Argument(..., help="A finished run directory."),
        name: str = typer.Option(..., "--name", help="Model name in the registry."),
        note: str = typer.Option("", "--note"),
        allow_duplicate: bool = typer.Option(False, "--allow-duplicate",
                                             help="Register an artifact that is already a version of NAME again."),
        url: Optional[str] = typer.Option(None, "--registry-url", help=URL_HELP)):
    """Register RUN_DIR's adapter (content-addressed) as the next version of NAME.

    Example: skilltune registry add runs/sql-20261128-120000 --name sql-demo --note "first LoRA"
    """
    v = _reg(url).add(run_dir, name, note, allow_duplicate)
    console.print(f"registered {v.name}@v{v.number} ({len(v.manifest)} files)")


@app.command("list")
def list_(name: Optional[str] = typer.Argument(None), url: Optional[str] = typer.Option(None, "--registry-url", help=URL_HELP)):
    """List registered versions and their aliases.

    Example: skilltune registry list sql-demo
    """
    reg = _reg(url)
    table = Table("version", "created", "method", "val loss", "primary metric", "aliases", "note")
    for v in reg.list(name):
        aliases = [a for a, n in reg.aliases(v.name).items() if n == v.number]
        ev = (v.metrics or {}).get("eval", {})
        prim = ev.get("primary_metric")
        pm = f"{prim} {ev['metrics'][prim]['tuned']:.3f}" if prim else "-"
        vl = v.lineage.get("best_val_loss")
        table.add_row(f"{v.name}@v{v.number}", v.created.strftime("%Y-%m-%d %H:%M"), v.method,
                      f"{vl:.4f}" if vl is not None else "-", pm, ", ".join(aliases), v.note)
    console.print(table)


@app.command()
def show(ref: str = typer.Argument(..., help="NAME@vN or NAME@alias."),
         url: Optional[str] = typer.Option(None, "--registry-url", help=URL_HELP)):
    """Lineage, metrics and aliases of one version.

    Example: skilltune registry show sql-demo@production
    """
    reg = _reg(url)
    v = reg.get(ref)
    aliases = [a for a, n in reg.aliases(v.name).items() if n == v.number]
    console.print_json(json.dumps({"version": f"{v.name}@v{v.number}", "aliases": aliases, "note": v.note,
                                   "created": v.created.isoformat(), "method": v.method, "lineage": v.lineage,
                                   "metrics": {k: (val.get("metrics") if isinstance(val, dict) and "metrics" in val
                                                   else val) for k, val in (v.metrics or {}).items()
                                               if k != "exports"},  # summarised below
                                   "files": v.manifest}, default=str))
    from skilltune.readiness.checklist import export_summary
    from skilltune.registry.api import lineage_chain

    console.print("chain: " + " -> ".join(lineage_chain(v)), highlight=False, markup=False)
    for key, record in ((v.metrics or {}).get("exports") or {}).items():
        console.print(f"export {key}: {export_summary(record)}", highlight=False, markup=False)


@app.command()
def diff(a: str, b: str, url: Optional[str] = typer.Option(None, "--registry-url", help=URL_HELP)):
    """Config, data and metric differences between two versions.

    Example: skilltune registry diff sql-demo@v1 sql-demo@v2
    """
    from skilltune.registry.api import diff_versions

    reg = _reg(url)
    for section, lines in diff_versions(reg.get(a), reg.get(b)).items():
        console.print(f"[bold]{section}[/bold]: " + ("no change" if not lines else ""))
        for line in lines:
            console.print(f"  {line}", highlight=False, markup=False)


@app.command()
def promote(ref: str = typer.Argument(..., help="NAME@vN"), alias: str = typer.Option("production", "--alias"),
            reason: str = typer.Option("", "--reason"),
            force: bool = typer.Option(False, "--force", help="Promote a version whose release gate failed (needs "
                                                              "--reason; recorded in the history)."),
            url: Optional[str] = typer.Option(None, "--registry-url", help=URL_HELP)):
    """Point ALIAS at a version (recorded in the history).

    Example: skilltune registry promote sql-demo@v2 --alias production --reason "sql_exec +4 points"
    """
    v = _reg(url).promote(ref, alias, reason, force=force)
    console.print(f"{v.name}@{alias} -> v{v.number}")


@app.command()
def rollback(name: str = typer.Argument(...), alias: str = typer.Option("production", "--alias"),
             reason: str = typer.Option("", "--reason"),
             dry_run: bool = typer.Option(False, "--dry-run", help="Check and record, move nothing."),
             url: Optional[str] = typer.Option(None, "--registry-url", help=URL_HELP)):
    """Move ALIAS back to the version it pointed at before.

    Example: skilltune registry rollback sql-demo --reason "latency regression"
    """
    frm, to = _reg(url).rollback(name, alias, reason, dry_run=dry_run)
    console.print(f"{'[dry run] would move' if dry_run else 'rolled back'} {name}@{alias}: v{frm} -> v{to}")


@app.command()
def history(name: str, alias: Optional[str] = typer.Option(None, "--alias"),
            url: Optional[str] = typer.Option(None, "--registry-url", help=URL_HELP)):
    """Every alias move: who, when, from, to, why.

    Example: skilltune registry history sql-demo
    """
    table = Table("when", "alias", "action", "from", "to", "who", "reason")
    for e in _reg(url).history(name, alias):
        table.add_row(e.when.strftime("%Y-%m-%d %H:%M:%S"), e.alias, e.action,
                      f"v{e.from_number}" if e.from_number else "-", f"v{e.to_number}", e.who, e.reason)
    console.print(table)


@app.command()
def upgrade(url: Optional[str] = typer.Option(None, "--registry-url", help=URL_HELP)):
    """Upgrade the registry database's schema to this skilltune's (once, for every client of a shared one).

    Example: SKILLTUNE_REGISTRY_URL=postgresql+psycopg://ci@db/registry skilltune registry upgrade
    """
    import os

    from skilltune.paths import home
    from skilltune.registry.db import make_engine, shown
    from skilltune.registry.migrate import ensure

    target = url or os.environ.get("SKILLTUNE_REGISTRY_URL") or f"sqlite:///{home() / 'registry' / 'registry.db'}"
    before, now = ensure(make_engine(target), shown(target), upgrade=True)
    console.print(f"registry {shown(target)}: schema {before or '(new)'} -> {now}" if before != now
                  else f"registry {shown(target)}: schema {now}, already current", highlight=False, soft_wrap=True)


@app.command()
def delete(ref: str, url: Optional[str] = typer.Option(None, "--registry-url", help=URL_HELP)):
    """Delete a version (refused while an alias points at it).

    Example: skilltune registry delete sql-demo@v1
    """
    _reg(url).delete(ref)
    console.print(f"deleted {ref}; `skilltune registry gc` frees the disk its files used (files other versions "
                  "share stay)", highlight=False)


@app.command()
def gc(dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be removed; remove nothing."),
       url: Optional[str] = typer.Option(None, "--registry-url", help=URL_HELP)):
    """Free the disk deleted versions used: store files no version names, partial copies a killed `registry
    add` left, and this machine's checkouts of deleted versions. Every version in the database is kept.

    Example: skilltune registry gc --dry-run
    """
    cleanup = _reg(url).gc(dry_run)
    parts = [(cleanup.unused, "store files no version uses", "unused"),
             (cleanup.partial, "partial copies of an interrupted add", "partial"),
             (cleanup.checkouts, "checkouts and merged copies of deleted versions", "checkouts")]
    verb = "would remove" if dry_run else "removed"
    for paths, what, key in parts:
        console.print(f"{verb} {len(paths)} {what} ({human_bytes(cleanup.sizes[key])})", highlight=False)
        if dry_run:
            for path in paths:
                plain(f"  {path}")
    total = sum(cleanup.sizes.values())
    console.print(f"{'would free' if dry_run else 'freed'} {human_bytes(total)}", highlight=False)

