"""`skilltune export` and `skilltune push`: ship a registered version, checked for train-to-serve parity."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from skilltune.cli.common import ConsoleStages, console, quiet_libraries

URL_HELP = "Registry database URL (default: SQLite in the skilltune home; or $SKILLTUNE_REGISTRY_URL)."


def _request(ref, out, fmt, quant, force, no_check, test, limit, db, trust_remote_code):
    from skilltune.export.build import ExportRequest

    return ExportRequest(ref, out, fmt, quant, force, not no_check, str(test) if test else None, limit,
                         str(db) if db else None, trust_remote_code)


def _print_parity(result) -> None:
    if result.parity is None:
        console.print("[yellow]parity not checked (--no-check): recorded as unchecked[/yellow]")
        return
    for line in result.parity.lines():
        console.print(("  " if result.parity.ok else "  [red]") + line + ("" if result.parity.ok else "[/red]"))


def export(ref: str = typer.Argument(..., help="NAME@vN or NAME@alias."),
           out: Optional[Path] = typer.Option(None, "--out", help="Folder to write (new or empty)."),
           fmt: str = typer.Option("hf", "--format", help="adapter | hf | gguf | ollama (and any registered)."),
           quant: str = typer.Option("q8_0", "--quant", help="GGUF quantisation: f32, f16, q8_0, q4_k_m."),
           adapter: Optional[Path] = typer.Option(None, "--adapter", help="Shorthand: --format adapter --out DIR."),
           merged: Optional[Path] = typer.Option(None, "--merged", help="Shorthand: --format hf --out DIR."),
           force: bool = typer.Option(False, "--force", help="Keep the export even if its parity check fails "
                                                              "(recorded as failed)."),
           no_check: bool = typer.Option(False, "--no-check", help="Skip the parity check (recorded as unchecked)."),
           test: Optional[Path] = typer.Option(None, "--test", help="Held-out prompts for the parity check "
                                                                    "(default: the version's test set)."),
           limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Check at most N prompts."),
           db: Optional[Path] = typer.Option(None, "--db", help="SQLite database for sql metrics, if it moved."),
           trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                  help="Run modelling code shipped with the base model."),
           url: Optional[str] = typer.Option(None, "--registry-url", help=URL_HELP)) -> None:
    """Export a version for where it will run, and check that it asks, stops and answers as trained.

    Formats: adapter (peft), hf (merged: transformers, vLLM, TGI, the Hub), gguf (llama.cpp), ollama
    (GGUF + Modelfile). Every export is checked on the version's held-out prompts (template, stop
    token, greedy answers); a failed check exits 1 and writes nothing unless --force.

    Example: skilltune export sql-demo@production --format gguf --quant q8_0 --out out/sql-gguf
    """
    quiet_libraries()
    from skilltune.errors import SkilltuneError
    from skilltune.export.build import export as do_export
    from skilltune.registry.api import Registry

    given = [(f, p) for f, p in (("adapter", adapter), ("hf", merged)) if p is not None]
    if len(given) > 1 or (given and out is not None):
        raise SkilltuneError("pass one destination: --out DIR (with --format), --adapter DIR or --merged DIR")
    if given:
        fmt, out = given[0]
    if out is None:
        raise SkilltuneError("where should the export go? pass --out DIR",
                             hint=f"skilltune export {ref} --format {fmt} --out out/{ref.split('@')[0]}-{fmt}")
    req = _request(ref, out, fmt, quant, force, no_check, test, limit, db, trust_remote_code)
    result = do_export(Registry(url), req, ConsoleStages())
    _print_parity(result)
    console.print(f"exported {ref} -> {result.out} ({fmt}{' ' + quant if fmt in ('gguf', 'ollama') else ''})")
    if result.command:
        console.print(f"next: {result.command}")


def push(ref: str = typer.Argument(..., help="NAME@vN or NAME@alias."),
         repo: str = typer.Option(..., "--repo", help="Hub repo id, ORG/NAME."),
         fmt: str = typer.Option("hf", "--format", help="hf (merged) or adapter."),
         public: bool = typer.Option(False, "--public", help="Create the repo public (default: private)."),
         dry_run: bool = typer.Option(False, "--dry-run", help="Build and validate everything; no network."),
         token_env: str = typer.Option("HF_TOKEN", "--token-env", help="Environment variable with the Hub token."),
         no_check: bool = typer.Option(False, "--no-check", help="Skip the parity check."),
         test: Optional[Path] = typer.Option(None, "--test", help="Held-out prompts for the parity check."),
         limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Check at most N prompts."),
         db: Optional[Path] = typer.Option(None, "--db", help="SQLite database for sql metrics, if it moved."),
         url: Optional[str] = typer.Option(None, "--registry-url", help=URL_HELP)) -> None:
    """Upload a version to the Hugging Face Hub as a model repo with its model card (private by default).

    Example: skilltune push sql-demo@production --repo acme/sql-demo --dry-run
    """
    quiet_libraries(offline=dry_run)
    from skilltune.export.push import push as do_push
    from skilltune.registry.api import Registry

    req = _request(ref, Path("."), fmt, "q8_0", False, no_check, test, limit, db, False)
    plan = do_push(Registry(url), req, repo, not public, dry_run, token_env, ConsoleStages())
    _print_parity(plan.result)
    size = sum(n for _, n in plan.files)
    console.print(f"{'would upload' if dry_run else 'uploaded'} {len(plan.files)} files ({size / 1e6:.1f} MB) to "
                  f"{repo} ({'private' if plan.private else 'public'}): {', '.join(f for f, _ in plan.files)}")
    if dry_run:
        console.print("dry run: the export, its parity check, the model card and the repo id are valid; "
                      "nothing was sent")
    else:
        console.print(f"pushed: {plan.url}")
