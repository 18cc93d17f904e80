"""`skilltune eval TARGET`: base vs finetuned on held-out data, one report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from skilltune.cli.common import SET_HELP, ConsoleStages, console, plain, quiet_libraries


def eval_(target: str = typer.Argument(..., help="A run directory, an adapter directory or a model spec."),
          test: Optional[str] = typer.Option(None, "--test", help="Held-out JSONL (default: the run's data.test)."),
          baseline: Optional[str] = typer.Option(None, "--baseline", help="Model to compare with (default: the base)."),
          against: Optional[str] = typer.Option(None, "--against", help="The release gate: compare with this registry "
                                                "version (e.g. NAME@production) on the same prompts; fails if the "
                                                "candidate is significantly worse or misses a target."),
          metrics: Optional[list[str]] = typer.Option(None, "--metrics", help="Metric names (repeatable)."),
          db: Optional[str] = typer.Option(None, "--db", help="SQLite database for sql_exec."),
          out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: RUN/eval)."),
          set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
          forgetting: bool = typer.Option(True, "--forgetting/--no-forgetting",
                                          help="Run the general-skills suite on base and tuned."),
          allow_code_metrics: bool = typer.Option(False, "--allow-code-metrics",
                                                  help="Let 'module:function' names in eval.metrics import and run "
                                                       "that Python code (off: built-in and installed plug-in "
                                                       "metrics only)."),
          trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                 help="Run modelling code shipped with the base model.")) -> None:
    """Compare the finetuned model with its base on the same prompts and write report.html/.md/results.json.

    Example: skilltune eval runs/sql-20261128-120000 --test examples/sql/data/test.jsonl --metrics sql_exec
    """
    quiet_libraries()
    from skilltune.evaluate.runner import evaluate, plan_eval

    plan = plan_eval(target, test, baseline, metrics, db, set_, forgetting, trust_remote_code, against)
    default_out = (plan.run_dir / "eval") if plan.run_dir else Path(
        f"eval-{plan.version.replace('@', '-')}" if plan.version else "eval-report")
    out_dir = out or default_out
    results = evaluate(plan, out_dir, ConsoleStages(), allow_code_metrics=allow_code_metrics)
    from skilltune.registry.api import Registry

    recorded = Registry().record_eval(results, plan.version)  # the checklist and promote read it there
    if recorded:
        console.print(f"recorded with {', '.join(recorded)} in the registry", highlight=False)
    if console.is_terminal:
        table = Table("metric", "base", "finetuned", "delta", "95% CI", title=f"{results['n_examples']} test examples")
        for name, m in results["metrics"].items():
            lo, hi = m["delta_ci95"]
            table.add_row(name, f"{m['base']:.3f}", f"{m['tuned']:.3f}", f"{m['delta']:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]")
        console.print(table)
    else:
        for name, m in results["metrics"].items():
            lo, hi = m["delta_ci95"]
            plain(f"eval: {name}: base {m['base']:.3f} -> finetuned {m['tuned']:.3f} ({m['delta']:+.3f}, 95% CI "
                  f"[{lo:+.3f}, {hi:+.3f}], {results['n_examples']} examples)")
    o = results.get("overfitting")
    if o:
        console.print(f"overfitting: val {o['val']:.3f} vs test {o['test']:.3f} -> "
                      + ("[red]FLAGGED[/red]" if o["flagged"] else "[green]OK[/green]"))
    f = results.get("forgetting")
    if f:
        console.print(f"forgetting: general suite {f['base_accuracy']:.2f} -> {f['tuned_accuracy']:.2f}, perplexity "
                      f"x{f['perplexity_ratio']:.2f} -> " + ("[red]FLAGGED[/red]" if f["flagged"] else "[green]OK[/green]"))
    for t in results.get("targets", []):
        shown = f"{t['value']:.3f}" if isinstance(t.get("value"), float) else str(t.get("value"))
        ci = f" (95% CI {t['ci95'][0]:.3f}-{t['ci95'][1]:.3f}, n={t['n']})" if "ci95" in t else f" ({t['judged_on']})"
        plain(f"target: {t['target']} {t['direction']} {t['threshold']}: {t['status'].upper()} at {shown}{ci}"
              + (f"; {t['note']}" if t.get("note") else ""))
    g = results.get("gate")
    if g:
        plain(f"gate against {g['against']}: {g['verdict']}")
    lc = results["latency_cost"]
    console.print(f"latency: single p50 {lc['single_latency_p50_s']:.2f} s; "
                  f"cost per 1,000 requests ${lc['cost_per_1000_requests']:.4f} at ${lc['price_per_hour']}/h")
    console.print(f"report: {out_dir / 'report.html'}")
