"""Render evaluation results as Markdown and as one self-contained HTML page.

Model outputs are untrusted text: every one goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path


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


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;width:100%;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;
text-align:left}th{background:#f3f3f3}.up{color:#070}.down{color:#a00}.flag{color:#a00;font-weight:bold}
pre{white-space:pre-wrap;margin:0;font-size:12px}"""


def render_html(results: dict, rows: list[dict], regressions: list[dict], worst: list[dict],
                loss_png: Path | None) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>skilltune eval</title><style>{_CSS}</style>"
           f"</head><body><h1>Evaluation: {e(str(results['target']))}</h1>",
           f"<p>Test set <code>{e(results['test_file'])}</code> ({results['n_examples']} examples); "
           f"baseline: {e(results['baseline'])}.</p>",
           "<h2>Base vs finetuned</h2><table><tr><th>metric</th><th>base</th><th>finetuned</th><th>delta</th>"
           "<th>95% CI (bootstrap)</th></tr>"]
    for name, m in results["metrics"].items():
        cls = "up" if (m["delta"] > 0) == m["higher_is_better"] and m["delta"] != 0 else "down"
        lo, hi = m["delta_ci95"]
        out.append(f"<tr><td title='{e(m['description'])}'>{e(name)}</td><td>{m['base']:.3f}</td>"
                   f"<td>{m['tuned']:.3f}</td><td class='{cls}'>{m['delta']:+.3f}</td>"
                   f"<td>[{lo:+.3f}, {hi:+.3f}]</td></tr>")
    out.append("</table>")
    if loss_png is not None:
        data = base64.b64encode(loss_png.read_bytes()).decode()
        out.append(f"<h2>Training loss</h2><img alt='loss curve' src='data:image/png;base64,{data}'>")
    o = results.get("overfitting")
    out.append("<h2>Overfitting check</h2>")
    if o:
        flag = "<span class='flag'>FLAGGED</span>" if o["flagged"] else "OK"
        out.append(f"<p>{e(o['metric'])}: validation {o['val']:.3f} vs test {o['test']:.3f} (gap {o['gap']:+.3f}, "
                   f"threshold {o['threshold']}); loss val {o['val_loss']:.4f} / test {o['test_loss']:.4f}. {flag}</p>")
    else:
        out.append("<p>Not run: no validation set recorded with the target.</p>")
    f = results.get("forgetting")
    out.append("<h2>Forgetting check</h2>")
    if f:
        flag = "<span class='flag'>FLAGGED</span>" if f["flagged"] else "OK"
        lost = f"; categories lost: {e(str(f['categories_lost']))}" if f.get("categories_lost") else ""
        fix = f"<br>Fix: <code>{e(f['fix'])}</code>" if f["flagged"] else ""
        out.append(f"<p>General suite accuracy: base {f['base_accuracy']:.3f}, finetuned {f['tuned_accuracy']:.3f} "
                   f"(drop {f['drop']:+.3f}, threshold {f['threshold']}); perplexity x{f['perplexity_ratio']:.2f}"
                   f"{lost}. {flag}{fix}</p>")
    else:
        out.append("<p>Not run.</p>")
    lc = results["latency_cost"]
    out.append(f"<h2>Latency and cost</h2><ul><li>batched ({lc['batch_size']}/batch): {lc['requests']} requests in "
               f"{lc['batched_wall_s']:.1f} s, {lc['generated_tokens_per_s']:.1f} generated tokens/s</li>"
               f"<li>one request at a time: p50 {lc['single_latency_p50_s']:.2f} s, "
               f"p95 {lc['single_latency_p95_s']:.2f} s</li><li>cost per 1,000 requests at "
               f"${lc['price_per_hour']}/hour: ${lc['cost_per_1000_requests']:.4f}</li></ul>")

    def table(title: str, items: list[dict]) -> None:
        out.append(f"<h2>{e(title)}</h2><table><tr><th>line</th><th>prompt</th><th>reference</th><th>base</th>"
                   "<th>finetuned</th></tr>")
        for r in items:
            out.append("<tr>" + f"<td>{r['line']}</td>" + "".join(
                f"<td><pre>{e(r[k])}</pre></td>" for k in ("prompt", "reference", "base_output", "tuned_output"))
                + "</tr>")
        out.append("</table>")

    table(f"Regressions: base right, finetuned wrong ({len(regressions)})", regressions[:20])
    table("Worst finetuned examples", worst)
    table("Sample of side-by-side outputs", rows[:20])
    out.append("</body></html>")
    return "\n".join(out)
