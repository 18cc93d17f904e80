"""`skilltune scorecard create|serve|report|export`: human review of base vs finetuned outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from skilltune.cli.common import ConsoleStages, console, listen_problem

app = typer.Typer(help="Blind A/B and rubric scoring by people, with agreement and a verdict.\n\n"
                       "Example: skilltune scorecard create --from runs/x/eval --name voice-1 --raters alice,bob",
                  no_args_is_help=True)
URL = typer.Option(None, "--url", help="Database URL (default: SQLite in the skilltune home).")


@app.command()
def create(source: Path = typer.Option(..., "--from", help="An eval folder (with per_example.jsonl)."),
           name: str = typer.Option(..., "--name", help="Study name."),
           criteria: Optional[str] = typer.Option(None, "--criteria", help="Comma-separated criteria (default: the "
                                                  "run's eval.scorecard_criteria, else relevance,factual_accuracy,"
                                                  "safety)."),
           mode: str = typer.Option("ab", "--mode", help="ab (blind A/B) | rubric"),
           sample: int = typer.Option(50, "--sample", min=1), raters: str = typer.Option("rater1", "--raters"),
           overlap: float = typer.Option(0.2, "--overlap", min=0.0, max=1.0, help="Share of items every rater sees (agreement)."),
           min_mean: float = typer.Option(4.0, "--min-mean", min=1.0, max=5.0, help="Gate: every criterion's mean for the tuned model."),
           criteria_file: Optional[Path] = typer.Option(None, "--criteria-file", help="JSON list of {name, description, "
                                                        "anchors: {1..5: text}} (overrides --criteria)."),
           seed: int = typer.Option(0, "--seed"), url: Optional[str] = URL) -> None:
    """Create a study from an evaluation and print each rater's personal link path.

    Example: skilltune scorecard create --from runs/sql/eval --name sql-review --raters alice,bob --sample 40
    """
    from skilltune.scorecard.study import DEFAULT_GATES, StudyError, create_study, criteria_for

    crit: list = [c.strip() for c in criteria.split(",") if c.strip()] if criteria else criteria_for(source)
    if criteria_file is not None:
        try:
            crit = json.loads(criteria_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StudyError(f"--criteria-file {criteria_file}: not readable JSON ({exc})",
                             hint='a list like [{"name": "tone", "description": "...", "anchors": {"1": "...", '
                                  '"5": "..."}}]') from None
    with ConsoleStages().stage(f"creating study {name!r} from {source}"):
        study, tokens = create_study(source, name, crit, mode, sample,
                                     [r.strip() for r in raters.split(",") if r.strip()], overlap, seed, url,
                                     {**DEFAULT_GATES, "min_mean": min_mean})
    console.print(f"study '{study.name}' created ({mode}); personal links (serve with `skilltune scorecard serve "
                  f"{study.name}`):")
    for rater, tok in tokens.items():
        console.print(f"  {rater}: /r/{tok}", highlight=False)


@app.command()
def serve(name: str, host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8765, "--port", min=1, max=65535),
          url: Optional[str] = URL) -> None:
    """Serve the rater app for a study.

    Example: skilltune scorecard serve sql-review --port 8765
    """
    import uvicorn

    from skilltune.errors import SkilltuneError
    from skilltune.scorecard.app import create_app
    from skilltune.scorecard.study import get_study

    study, Session = get_study(name, url)
    if problem := listen_problem(host, port):
        raise SkilltuneError(problem[0], hint=problem[1])
    console.print(f"scorecard '{name}' on http://{host}:{port}/r/<rater token>")
    uvicorn.run(create_app(Session, name), host=host, port=port, log_level="warning")


@app.command()
def report(name: str, fmt: str = typer.Option("md", "--format", help="md | json | html"),
           url: Optional[str] = URL) -> int:
    """Scores per model and criterion, A/B win rate, agreement, critical failures and the verdict.

    Example: skilltune scorecard report sql-review
    """
    from skilltune.scorecard.report import record, render_markdown, study_report
    from skilltune.templates import render

    r = study_report(name, url)
    record(r)
    if fmt == "json":
        print(json.dumps(r, indent=2))
    elif fmt == "html":
        print(render("scorecard_report.html", study=r["study"], markdown=render_markdown(r)))
    else:
        console.print(render_markdown(r), markup=False, highlight=False)
    return 0 if r["passed"] else 1


@app.command()
def export(name: str, out: Optional[Path] = typer.Option(None, "--out", help="File to write (.jsonl or .csv)."),
           preferences: Optional[Path] = typer.Option(None, "--preferences", help="Write the A/B judgements as "
                                                      "preference pairs (JSONL) for `train.objective: dpo`."),
           url: Optional[str] = URL) -> None:
    """Write every judgement as JSONL or CSV, or (--preferences) the agreed A/B winners as preference pairs.

    Example: skilltune scorecard export sql-review --out judgements.csv
    Example: skilltune scorecard export voice-1 --preferences prefs.jsonl
    """
    from skilltune.paths import atomic_write_text
    from skilltune.scorecard.study import export_rows, to_csv

    if (out is None) == (preferences is None):
        raise typer.BadParameter("pass exactly one of --out FILE (the judgements) or --preferences FILE (the pairs)")
    if preferences is not None:
        _export_preferences(name, preferences, url)
        return
    rows = export_rows(name, url)
    text = to_csv(rows) if out.suffix == ".csv" else "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_text(out, text)
    console.print(f"{len(rows)} judgements -> {out}")


def _export_preferences(name: str, out: Path, url: Optional[str]) -> None:
    from skilltune.paths import atomic_write_text
    from skilltune.scorecard.study import PREFERENCE_RULE, preference_pairs

    from skilltune.scorecard.study import StudyError

    rows, counts = preference_pairs(name, url)
    left = ", ".join(f"{counts[k]} {k}" for k in ("tie", "both bad", "no majority", "empty or identical answers",
                                                  "not judged") if counts.get(k))
    if not rows:
        raise StudyError(f"no preference pairs in study {name!r}: of {counts['items']} items, {left or 'none'}",
                         hint=f"{PREFERENCE_RULE}; judge more items (skilltune scorecard serve {name})")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tuned = sum(r["chosen_model"] == "tuned" for r in rows)
    console.print(f"{len(rows)} preference pairs from {counts['items']} items ({counts['votes']} judgements) -> {out}",
                  highlight=False)
    console.print(f"left out: {left or 'none'}", highlight=False)
    console.print(f"rule: {PREFERENCE_RULE}", highlight=False)
    if rows:
        console.print(f"the finetuned model's answer was chosen in {tuned} of {len(rows)} pairs", highlight=False)
    console.print(f"next: audit them (skilltune data audit {out}), then train with train.objective: dpo",
                  highlight=False)
