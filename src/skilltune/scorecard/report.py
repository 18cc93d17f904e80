"""Study results: per-model scores, A/B win rate, inter-rater agreement, critical failures, a verdict.

Agreement is computed on items every rater saw (the overlap): Cohen's kappa for two
raters, Krippendorff's alpha (nominal for the A/B choice, interval for scores) for
more. Reading: >= 0.8 reliable, >= 0.667 tentative, below that unreliable.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter, defaultdict

from sqlalchemy import select

from skilltune.evaluate.stats import bootstrap_mean
from skilltune.scorecard.db import Item, Judgement, Rater
from skilltune.scorecard.study import get_study


def cohen_kappa(a: list, b: list) -> float:
    """Cohen's kappa of two raters' labels on the same items."""
    n = len(a)
    if n == 0:
        return float("nan")
    po = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    return 1.0 if pe == 1 else (po - pe) / (1 - pe)


def krippendorff_alpha(units: list[list], metric: str = "nominal") -> float:
    """Krippendorff's alpha; ``units`` holds, per item, the values the raters gave (None = not rated)."""
    def delta(x, y):
        return float(x != y) if metric == "nominal" else (float(x) - float(y)) ** 2

    pairable = [[v for v in u if v is not None] for u in units]
    pairable = [u for u in pairable if len(u) >= 2]
    n = sum(len(u) for u in pairable)
    if n <= 1:
        return float("nan")
    do = sum(sum(delta(x, y) for i, x in enumerate(u) for j, y in enumerate(u) if i != j) / (len(u) - 1)
             for u in pairable) / n
    values = [v for u in pairable for v in u]
    de = sum(delta(x, y) for i, x in enumerate(values) for j, y in enumerate(values) if i != j) / (n * (n - 1))
    return 1.0 if de == 0 else 1 - do / de


MIN_SHARED_ITEMS = 10  # fewer items rated by two raters say nothing about agreement, whatever the value


def reading(x: float, items: int | None = None) -> str:
    if items is not None and items < MIN_SHARED_ITEMS:
        return f"insufficient ({items} shared item{'s' if items != 1 else ''} < {MIN_SHARED_ITEMS})"
    if x != x:  # nan
        return "not enough overlap"
    return "reliable" if x >= 0.8 else ("tentative" if x >= 0.667 else "unreliable")


def _agreement_ci(units: list[list], compute, n: int = 200, seed: int = 0) -> list[float]:
    """95% bootstrap interval of an agreement figure, resampling the shared items."""
    import random

    rng = random.Random(seed)
    values = []
    for _ in range(n):
        value = compute([units[rng.randrange(len(units))] for _ in units])
        if value == value:
            values.append(value)
    if not values:
        return [float("nan"), float("nan")]
    values.sort()
    return [values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]]


def _model(item: Item, side: str) -> str:
    return item.a_is if side == "A" else ("base" if item.a_is == "tuned" else "tuned")


def study_report(name: str, url: str | None = None) -> dict:
    study, Session = get_study(name, url)
    with Session() as s:
        rows = s.execute(select(Judgement, Item, Rater).join(Item, Judgement.item_id == Item.id)
                         .join(Rater, Judgement.rater_id == Rater.id).where(Item.study_id == study.id)).all()
        raters = [r.name for r in s.scalars(select(Rater).where(Rater.study_id == study.id)).all()]
    crits = [c["name"] for c in study.criteria]
    scores: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    wins, critical = [], []
    by_item: dict[int, dict[str, Judgement]] = defaultdict(dict)
    for j, item, rater in rows:
        by_item[item.id][rater.name] = (j, item)
        for c, sides in j.scores.items():
            for side, v in sides.items():
                scores[_model(item, side)][c].append(v)
        if study.mode == "ab" and j.choice:
            winner = {"A": _model(item, "A"), "B": _model(item, "B")}.get(j.choice, j.choice)
            wins.append(winner)
        if j.critical:
            critical.append({"item": item.id, "rater": rater.name, "criterion": j.critical_criterion,
                             "model": _model(item, j.critical_side or "A"), "note": j.critical_note,
                             "prompt": item.prompt[:200]})
    per_model = {m: {c: {"mean": statistics.fmean(v), "median": statistics.median(v), "n": len(v),
                         "distribution": {str(k): v.count(k) for k in range(1, 6)}}
                     for c, v in cs.items()} for m, cs in scores.items()}
    win = None
    if wins:
        score = [1.0 if w == "tuned" else 0.5 if w == "tie" else 0.0 for w in wins]
        mean, lo, hi = bootstrap_mean(score)
        win = {"n": len(wins), "tuned": wins.count("tuned") / len(wins), "base": wins.count("base") / len(wins),
               "tie": wins.count("tie") / len(wins), "both_bad": wins.count("both_bad") / len(wins),
               "tuned_score": mean, "tuned_score_ci95": [lo, hi]}
    overlap_items = [v for v in by_item.values() if len(v) >= 2]
    agreement = {}
    if overlap_items and len(raters) >= 2:
        def labels(fn):
            return [[fn(v[r][0], v[r][1]) if r in v else None for r in raters] for v in overlap_items]
        targets = {"choice": (lambda j, it: j.choice)} if study.mode == "ab" else {}
        for c in crits:
            targets[c] = (lambda c: lambda j, it: j.scores.get(c, {}).get("B" if it.a_is == "base" else "A"))(c)
        for key, fn in targets.items():
            units = [u for u in labels(fn) if sum(v is not None for v in u) >= 2]  # rated by two raters or more
            if len(raters) == 2:
                method = "cohen_kappa"

                def compute(us):
                    return cohen_kappa([u[0] for u in us], [u[1] for u in us]) if us else float("nan")
            else:
                method, metric = "krippendorff_alpha", "nominal" if key == "choice" else "interval"

                def compute(us, metric=metric):
                    return krippendorff_alpha(us, metric)
            value = compute(units)
            agreement[key] = {"method": method, "value": value, "ci95": _agreement_ci(units, compute),
                              "items": len(units), "raters": len(raters), "reading": reading(value, len(units))}
    gates = study.gates
    tuned = per_model.get("tuned", {})
    failures = [f"{c} mean {tuned[c]['mean']:.2f} < {gates['min_mean']}" for c in crits
                if c in tuned and tuned[c]["mean"] < gates["min_mean"]]
    failures += [f"critical failure in {f['criterion']} (item {f['item']}): {f['note']}" for f in critical
                 if f["model"] == "tuned" and f["criterion"] in gates.get("no_critical_in", [])]
    if not tuned:
        failures.append("no judgements yet")
    if len(raters) >= 2:  # several raters: their verdict counts only if they are shown to agree
        shared = min((a["items"] for a in agreement.values()), default=0)
        if shared < MIN_SHARED_ITEMS:
            failures.append(f"inter-rater agreement insufficient: {shared} item(s) rated by several raters, "
                            f"{MIN_SHARED_ITEMS} needed (raise --overlap or --sample)")
        else:
            failures += [f"raters disagree on {k} ({a['method']} {a['value']:.2f}, {a['reading']})"
                         for k, a in agreement.items() if a["reading"] == "unreliable"]
    return {"study": study.name, "mode": study.mode, "raters": raters, "judgements": len(rows),
            "criteria": crits, "per_model": per_model, "ab": win, "agreement": agreement,
            "critical_failures": critical, "gates": gates, "passed": not failures,
            "verdict": "PASS" if not failures else "FAIL: " + "; ".join(failures),
            "run_dir": study.run_dir, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def record(report: dict) -> None:
    """Keep the result where the readiness checklist reads it: every registry version of the same run."""
    from skilltune.registry.api import Registry

    reg = Registry()
    for ref in reg.versions_of_run(report["run_dir"]):
        reg.attach_metrics(ref, "scorecard", {
            "study": report["study"], "passed": report["passed"], "verdict": report["verdict"],
            "judgements": report["judgements"], "created": report["created"]})


def render_markdown(r: dict) -> str:
    lines = [f"# Scorecard: {r['study']} ({r['mode']})", "", f"Raters: {', '.join(r['raters'])}; "
             f"{r['judgements']} judgements.", "", f"**Verdict: {r['verdict']}**", "",
             "| model | criterion | mean | median | 1-5 distribution |", "|---|---|---|---|---|"]
    for m, cs in sorted(r["per_model"].items()):
        for c, v in cs.items():
            lines.append(f"| {m} | {c} | {v['mean']:.2f} | {v['median']} | {json.dumps(v['distribution'])} |")
    if r["ab"]:
        ab = r["ab"]
        lines += ["", f"A/B: tuned wins {ab['tuned']:.0%}, base wins {ab['base']:.0%}, ties {ab['tie']:.0%}, both bad "
                      f"{ab['both_bad']:.0%}; tuned score {ab['tuned_score']:.2f} (95% CI {ab['tuned_score_ci95'][0]:.2f}"
                      f"-{ab['tuned_score_ci95'][1]:.2f})"]
    if r["agreement"]:
        lines += ["", "| agreement on | method | value | 95% CI | shared items | raters | reading |",
                  "|---|---|---|---|---|---|---|"]
        for k, a in r["agreement"].items():
            lo, hi = a["ci95"]
            lines.append(f"| {k} | {a['method']} | {a['value']:.3f} | {lo:.2f}-{hi:.2f} | {a['items']} | "
                         f"{a['raters']} | {a['reading']} |")
    lines += ["", f"## Critical failures ({len(r['critical_failures'])})"]
    lines += [f"- item {f['item']} ({f['model']}, {f['criterion']}, by {f['rater']}): {f['note']}"
              for f in r["critical_failures"]]
    return "\n".join(lines) + "\n"
