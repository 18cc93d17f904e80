"""Render evaluation results as Markdown and as one self-contained HTML page.

Model outputs are untrusted text: the HTML page comes from an autoescaping Jinja template.
"""

from __future__ import annotations

import base64
from pathlib import Path

from skilltune.templates import render


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def render_markdown(results: dict, rows: list[dict], regressions: list[dict], worst: list[dict]) -> str:
    lines = [f"# Evaluation: {results['target']}", "",
             f"Test set: `{results['test_file']}` ({results['n_examples']} examples); baseline: {results['baseline']}.",
             "", "| metric | base | finetuned | delta | 95% CI |", "|---|---|---|---|---|"]
    for name, m in results["metrics"].items():
        lo, hi = m["delta_ci95"]
        lines.append(f"| {name} | {_fmt(m['base'])} | {_fmt(m['tuned'])} | {m['delta']:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    o = results.get("overfitting")
    lines += ["", "## Overfitting check"]
    if o:
        lines.append(f"{o['metric']}: validation {o['val']:.3f} vs test {o['test']:.3f} (gap {o['gap']:+.3f}, "
                     f"threshold {o['threshold']}); loss val {o['val_loss']:.4f} / test {o['test_loss']:.4f}. "
                     + ("**FLAGGED**" if o["flagged"] else "OK"))
    else:
        lines.append("Not run: no validation set recorded with the target.")
    f = results.get("forgetting")
    lines += ["", "## Forgetting check"]
    if f:
        lines.append(f"General suite accuracy: base {f['base_accuracy']:.3f}, finetuned {f['tuned_accuracy']:.3f} "
                     f"(drop {f['drop']:+.3f}, threshold {f['threshold']}); perplexity x{f['perplexity_ratio']:.2f}"
                     + (f"; categories lost: {f['categories_lost']}" if f.get("categories_lost") else "") + ". "
                     + ("**FLAGGED** — " + f["fix"] if f["flagged"] else "OK"))
    else:
        lines.append("Not run.")
    lc = results["latency_cost"]
    lines += ["", "## Latency and cost",
              f"- batched ({lc['batch_size']}/batch): {lc['requests']} requests in {lc['batched_wall_s']:.1f} s, "
              f"{lc['generated_tokens_per_s']:.1f} generated tokens/s",
              f"- one request at a time: p50 {lc['single_latency_p50_s']:.2f} s, p95 {lc['single_latency_p95_s']:.2f} s",
              f"- cost per 1,000 requests at ${lc['price_per_hour']}/hour: ${lc['cost_per_1000_requests']:.4f}",
              "", f"## Regressions (base right, finetuned wrong on {results['primary_metric']}): {len(regressions)}"]
    for r in regressions[:10]:
        lines.append(f"- line {r['line']}: {r['prompt'][:100]!r}")
    lines += ["", "## Sample of outputs", "", "| prompt | reference | base | finetuned |", "|---|---|---|---|"]
    for r in rows[:10]:
        cells = [r["prompt"], r["reference"], r["base_output"], r["tuned_output"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")[:160] for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render_html(results: dict, rows: list[dict], regressions: list[dict], worst: list[dict],
                loss_png: Path | None) -> str:
    """One self-contained page (``eval_report.html``); every model output is escaped by the template."""
    png = base64.b64encode(loss_png.read_bytes()).decode() if loss_png is not None else None
    tables = [(f"Regressions: base right, finetuned wrong ({len(regressions)})", regressions[:20]),
              ("Worst finetuned examples", worst), ("Sample of side-by-side outputs", rows[:20])]
    return render("eval_report.html", results=results, loss_png=png, tables=tables)
