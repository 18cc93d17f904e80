"""`skilltune data audit|clean|split|mix|replay|sql-grammar`: look at training data before training on it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from skilltune.cli.common import (COLUMN_HELP, DATA_CONFIG_HELP, ConsoleStages, console, data_shape, plain,
                                  quiet_libraries)
from skilltune.errors import DataError

app = typer.Typer(help="Audit, clean, split and mix training data.\n\nExample: skilltune data audit train.jsonl",
                  no_args_is_help=True)

_STATUS = {"PASS": "[green]PASS[/green]", "WARN": "[yellow]WARN[/yellow]", "FAIL": "[red]FAIL[/red]"}


@app.command()
def audit(file: Path = typer.Argument(..., help="Data file (JSONL, JSON, CSV, Parquet)."),
          test: Optional[Path] = typer.Option(None, "--test", help="Test file to check for train/test leakage."),
          model: str = typer.Option("embedded:smollm2-135m-instruct", "--model", help="Tokenizer for token counts."),
          max_seq_len: int = typer.Option(1024, "--max-seq-len", min=1, help="Examples longer than this are errors."),
          near_dup: float = typer.Option(0.85, "--near-dup", min=0.0, max=1.0, help="Near-duplicate Jaccard threshold."),
          fmt: str = typer.Option("table", "--format", help="table | json | md | html"),
          out: Optional[Path] = typer.Option(None, "--out", help="Write the json/md/html report here."),
          strict: bool = typer.Option(False, "--strict", help="Warnings fail too (exit 1)."),
          no_tokenizer: bool = typer.Option(False, "--no-tokenizer", help="Skip token counts (no model needed)."),
          column: Optional[list[str]] = typer.Option(None, "--column", help=COLUMN_HELP),
          config: Optional[Path] = typer.Option(None, "--config", help=DATA_CONFIG_HELP)) -> int:
    """Check FILE for what ruins finetunes; exit 0 clean, 1 errors (or warnings with --strict), 2 unreadable.

    Example: skilltune data audit examples/sql/data/train.jsonl --test examples/sql/data/test.jsonl
    """
    quiet_libraries()
    from skilltune.data.audit import audit_file
    from skilltune.data.audit.checks import token_counts
    from skilltune.data.audit.run import render_html, render_json, render_markdown
    from skilltune.data.reader import not_a_data_file
    from skilltune.data.records import record_audit

    if fmt not in ("table", "json", "md", "html"):
        raise DataError(f"--format {fmt!r}: use table, json, md or html")
    if problem := not_a_data_file(file):
        raise DataError(problem, hint="pass a .jsonl, .json, .csv or .parquet file")
    tokenizer = None
    if not no_tokenizer:
        from skilltune.config.schema import ModelConfig
        from skilltune.model.loading import load_tokenizer

        tokenizer = load_tokenizer(ModelConfig(base=model))[0]
    shape, columns = data_shape(column, config)
    rep = audit_file(str(file), str(test) if test else None, tokenizer, max_seq_len, near_dup, shape, columns)
    record_audit(rep)
    if fmt == "table" and not console.is_terminal:  # pipes, CI logs, editors: one greppable line per finding
        for r in rep.results:
            plain(f"{file}: {r.name}: {r.status}: {r.summary}")
            for f in r.findings:  # "a:1 = a:2" (duplicates, leakage): the first place leads, the rest follow
                first, *others = re.split(r" (?:=|<->) ", f.where)
                plain(f"{first}: {r.name}: {f.message}" + (f" (with {', '.join(others)})" if others else ""))
            if r.status != "PASS" and r.fix:
                plain(f"{file}: {r.name}: fix: {r.fix}")
        plain(f"{file}: {rep.errors} error(s), {rep.warnings} warning(s) in {rep.seconds:.1f} s")
    elif fmt == "table":
        table = Table("check", "status", "count", "summary", "first examples", title=f"data audit: {file}")
        for r in rep.results:
            first = "\n".join(f"{f.where}: {f.message}"[:110] for f in r.findings[:3])
            table.add_row(r.name, _STATUS[r.status], str(r.count), r.summary, first)
        console.print(table)
        for r in rep.results:
            if r.status != "PASS" and r.fix:
                console.print(f"[bold]{r.name}[/bold]: {r.fix}", highlight=False)
        console.print(f"{rep.errors} error(s), {rep.warnings} warning(s) in {rep.seconds:.1f} s")
    else:
        ctx_counts = None
        if fmt == "html" and tokenizer is not None:
            from skilltune.data.audit.base import AuditContext
            from skilltune.data.reader import read_file
            from skilltune.model.tokenizer import turn_end_token

            ctx = AuditContext(str(file), read_file(file, shape, columns), tokenizer=tokenizer,
                               end_token=turn_end_token(tokenizer))
            ctx_counts = token_counts(ctx)
        text = {"json": render_json, "md": render_markdown}.get(fmt, lambda r: render_html(r, ctx_counts))(rep)
        if out:
            from skilltune.paths import atomic_write_text

            atomic_write_text(out, text)
            console.print(f"report written to {out}")
        else:
            print(text)
    return rep.exit_code(strict)


@app.command("clean")
def clean_(src: Path = typer.Argument(..., help="Input file (never modified)."),
           dst: Path = typer.Argument(..., help="Output JSONL."),
           near_dups: bool = typer.Option(False, "--near-dups", help="Also drop near-duplicates."),
           redact_pii: bool = typer.Option(False, "--redact", help="Replace PII/secrets with [EMAIL]-style tags."),
           threshold: float = typer.Option(0.85, "--near-dup", min=0.0, max=1.0, help="Near-duplicate Jaccard threshold."),
           column: Optional[list[str]] = typer.Option(None, "--column", help=COLUMN_HELP),
           config: Optional[Path] = typer.Option(None, "--config", help=DATA_CONFIG_HELP)) -> None:
    """Drop malformed rows and duplicates (optionally redact PII) into DST, with a sidecar of what was dropped.

    Example: skilltune data clean raw.jsonl clean.jsonl --near-dups --redact
    """
    from skilltune.data.ops import clean

    shape, columns = data_shape(column, config)
    res = clean(src, dst, near_dups, redact_pii, threshold, shape, columns)
    console.print(f"kept {res.kept}, dropped {res.dropped} {res.reasons or ''} -> {res.out}; "
                  f"dropped rows listed in {res.sidecar}", highlight=False)


@app.command("split")
def split_(src: Path = typer.Argument(..., help="Input file (never modified)."),
           val: float = typer.Option(0.1, "--val", help="Validation fraction."),
           test: float = typer.Option(0.1, "--test", help="Test fraction."),
           seed: int = typer.Option(42, "--seed", help="Seed (same seed, same split)."),
           out_dir: Path = typer.Option(Path("."), "--out-dir", help="Where train/val/test.jsonl go."),
           column: Optional[list[str]] = typer.Option(None, "--column", help=COLUMN_HELP),
           config: Optional[Path] = typer.Option(None, "--config", help=DATA_CONFIG_HELP)) -> None:
    """Split SRC into train/val/test; near-duplicate clusters stay in one split (no leakage).

    Example: skilltune data split all.jsonl --val 0.1 --test 0.1 --seed 7 --out-dir data/
    """
    from skilltune.data.ops import split

    shape, columns = data_shape(column, config)
    counts = split(src, out_dir, val, test, seed, fmt=shape, columns=columns)
    console.print(f"train {counts['train']}, val {counts['val']}, test {counts['test']} -> {out_dir}")


@app.command("mix")
def mix_(skill: Path = typer.Argument(..., help="Skill data."),
         general: Path = typer.Argument(..., help="General-purpose instruction data."),
         dst: Path = typer.Argument(..., help="Output JSONL."),
         ratio: float = typer.Option(0.08, "--ratio", help="Share of general data in the output (0.05-0.10)."),
         seed: int = typer.Option(42, "--seed"),
         column: Optional[list[str]] = typer.Option(None, "--column", help=COLUMN_HELP + " Applies to SKILL."),
         config: Optional[Path] = typer.Option(None, "--config", help=DATA_CONFIG_HELP)) -> None:
    """Mix general data into the skill set against catastrophic forgetting.

    Example: skilltune data mix train.jsonl general.jsonl mixed.jsonl --ratio 0.08
    """
    from skilltune.data.ops import mix

    counts = mix(skill, general, ratio, dst, seed, data_shape(column, config)[1])
    console.print(f"{counts['skill']} skill + {counts['general']} general = {counts['total']} rows -> {dst}")


@app.command("sql-grammar")
def sql_grammar_(db: Path = typer.Argument(..., help="SQLite database (opened read-only)."),
                 out: Optional[Path] = typer.Option(None, "--out", help="Write the grammar here (default: print it).")
                 ) -> None:
    """Write the Lark grammar of one SELECT over DB's tables and columns, to decode SQL answers under it.

    Use it as eval.grammar with eval.response_format: grammar, as `generate --grammar`, or send its text as a
    server request's structured_outputs.grammar: the model can then only name tables and columns DB has.

    Example: skilltune data sql-grammar examples/sql/data/analytics.db --out sql.lark
    """
    from skilltune.evaluate.sql_grammar import sqlite_grammar
    from skilltune.paths import atomic_write_text

    text = sqlite_grammar(db)
    if out is None:
        typer.echo(text, nl=False)
        return
    if out.resolve() == db.resolve():
        raise typer.BadParameter("--out is the database itself; give another file", param_hint="--out")
    atomic_write_text(out, text)
    console.print(f"wrote the grammar of {db}'s tables to {out}", highlight=False)


@app.command("replay")
def replay_(dst: Path = typer.Argument(..., help="Output JSONL."),
            model: str = typer.Option("embedded:smollm2-135m-instruct", "--model", help="The base model."),
            n: int = typer.Option(200, "--n", min=1, help="How many general examples."),
            max_new_tokens: int = typer.Option(192, "--max-new-tokens", min=1),
            seed: int = typer.Option(42, "--seed")) -> None:
    """Build general data with no download: the base model answers bundled general prompts (self-distillation).

    Killed, the same command continues where it stopped (answers are journalled beside DST as they are made).

    Example: skilltune data replay general.jsonl --n 200 && skilltune data mix train.jsonl general.jsonl mixed.jsonl
    """
    quiet_libraries()
    from skilltune.data.replay import replay

    res = replay(model, dst, n, max_new_tokens, seed, stages=ConsoleStages())
    dropped = res.unfinished + res.empty
    console.print(f"wrote {res.written} of {res.asked} general examples answered by {model} -> {dst}"
                  + (f" ({res.resumed} answered by the interrupted run resumed)" if res.resumed else "")
                  + (f"; dropped {dropped}: {res.unfinished} did not finish within --max-new-tokens "
                     f"{max_new_tokens} (they would teach rambling), {res.empty} were empty" if dropped else ""),
                  highlight=False, soft_wrap=True)


@app.command()
def spotcheck(file: Path = typer.Argument(..., help="Data file."),
              n: int = typer.Option(20, "--n", min=1, help="Examples to review."),
              reviewer: str = typer.Option(..., "--reviewer", help="Who reviews."),
              record: Optional[Path] = typer.Option(None, "--record", help="Verdicts reviewed elsewhere: JSONL of "
                                                    "{\"line\": N, \"ok\": true|false, \"note\": \"...\"}."),
              interactive: Optional[bool] = typer.Option(None, "--interactive/--show-only",
                                                         help="Ask ok/flag for each example (default: when stdin is "
                                                              "a terminal); --show-only records nothing."),
              seed: int = typer.Option(0, "--seed"),
              column: Optional[list[str]] = typer.Option(None, "--column", help=COLUMN_HELP),
              config: Optional[Path] = typer.Option(None, "--config", help=DATA_CONFIG_HELP)) -> None:
    """Review N random examples; the checklist's evidence is recorded only when the review is finished.

    Each example: o = ok, f = flag (with a note), q = quit without recording. Or review elsewhere and
    pass the verdicts with --record.

    Example: skilltune data spotcheck train.jsonl --n 20 --reviewer alice
    """
    import random
    import sys

    from skilltune.data.reader import read_file
    from skilltune.data.records import record_spotcheck

    rep = read_file(file, *data_shape(column, config))
    if record is not None:
        verdicts = _read_verdicts(record, {ex.line for ex in rep.examples}, file)
    else:
        picks = random.Random(seed).sample(rep.examples, min(n, len(rep.examples)))
        ask = sys.stdin.isatty() if interactive is None else interactive
        verdicts = []
        for k, ex in enumerate(picks, 1):
            console.rule(f"{k}/{len(picks)}  {ex.where}")
            for t in ex.turns:
                console.print(f"[bold]{t.role}[/bold]: {escape(t.content)}", highlight=False)
            if ask:
                answer = typer.prompt("ok (o), flag (f) or quit (q)", default="o").strip().lower()
                if answer.startswith("q"):
                    console.print("quit: nothing recorded (a spot-check counts only when finished)")
                    raise typer.Exit(1)
                note = typer.prompt("what is wrong").strip() if answer.startswith("f") else ""
                verdicts.append({"line": ex.line, "ok": not answer.startswith("f"), "note": note})
        if not ask:
            console.print("shown only, nothing recorded: review on a terminal (or with --interactive), or pass "
                          "the verdicts with --record VERDICTS.jsonl", highlight=False)
            return
    if not verdicts:
        raise DataError(f"{file}: no examples were reviewed, so there is nothing to record")
    path = record_spotcheck(str(file), reviewer, verdicts)
    flagged = [v for v in verdicts if not v["ok"]]
    console.print(f"spot-check recorded: {len(verdicts)} reviewed by {reviewer}, {len(flagged)} flagged ({path})",
                  highlight=False)


def _read_verdicts(path: Path, lines: set[int], data_file: Path) -> list[dict]:
    import json

    verdicts, problems = [], []
    for i, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            v = json.loads(raw)
            line, ok, note = int(v["line"]), bool(v["ok"]), str(v.get("note") or "")
        except (ValueError, KeyError, TypeError):
            problems.append(f"{path}:{i}: expected {{\"line\": N, \"ok\": true|false, \"note\": \"...\"}}")
            continue
        if line not in lines:
            problems.append(f"{path}:{i}: line {line} is not an example of {data_file}")
        elif not ok and not note:
            problems.append(f"{path}:{i}: a flagged example needs a note saying what is wrong")
        else:
            verdicts.append({"line": line, "ok": ok, "note": note})
    if problems:
        raise DataError(f"{len(problems)} problem(s) in the verdicts:\n  " + "\n  ".join(problems[:10]))
    return verdicts