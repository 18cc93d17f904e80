"""Business targets (``eval.targets``) judged on evidence, and the release gate against production.

A target is met only when the whole 95% interval is on the right side of the
threshold (its lower bound for a higher-is-better metric, upper bound otherwise), so
89% measured on 100 questions does not "meet" a 0.88 target. When the interval
straddles the threshold, the report says roughly how many more test examples would
decide it (the interval narrows as 1/sqrt(n)).

Targets can name any registered metric, plus the operational figures eval measures:
``latency_p95_s``, ``cost_per_1000_requests`` and ``forgetting_drop`` (lower is better;
judged on the point estimate, which is all one eval run measures — a load test gives
latency under load).
"""

from __future__ import annotations

import math

from skilltune.evaluate.stats import bootstrap_mean

# Operational figures a target may name: where eval's results hold them; all lower-is-better.
OPERATIONAL = {
    "latency_p95_s": lambda r: (r.get("latency_cost") or {}).get("single_latency_p95_s"),
    "cost_per_1000_requests": lambda r: (r.get("latency_cost") or {}).get("cost_per_1000_requests"),
    "forgetting_drop": lambda r: (r.get("forgetting") or {}).get("drop"),
}
MET, NOT_MET, UNDECIDED = "met", "not met", "undecided"


def known_target_names(metric_names) -> list[str]:
    return [*metric_names, *OPERATIONAL]


def _more_needed(n: int, mean: float, lo: float, hi: float, threshold: float) -> int | None:
    gap = abs(mean - threshold)
    if gap == 0:
        return None  # on the threshold: no sample size decides it
    half = (hi - lo) / 2
    return max(1, math.ceil(n * (half / gap) ** 2) - n)


def judge_metric(name: str, threshold: float, scores: list[float], higher_is_better: bool) -> dict:
    """One metric target on per-example scores: met, not met or undecided, with its interval."""
    mean, lo, hi = bootstrap_mean(scores)
    if higher_is_better:
        status = MET if lo >= threshold else NOT_MET if hi < threshold else UNDECIDED
    else:
        status = MET if hi <= threshold else NOT_MET if lo > threshold else UNDECIDED
    out = {"target": name, "threshold": threshold, "direction": ">=" if higher_is_better else "<=",
           "value": mean, "ci95": [lo, hi], "n": len(scores), "status": status, "judged_on": "95% interval"}
    if status == UNDECIDED:
        more = _more_needed(len(scores), mean, lo, hi, threshold)
        out["more_examples_needed"] = more
        out["note"] = (f"the interval straddles {threshold}: about {more} more test examples would decide it"
                       if more else f"the estimate sits on {threshold}: no test-set size decides it")
    return out


def judge_operational(name: str, threshold: float, results: dict) -> dict:
    value = OPERATIONAL[name](results)
    out = {"target": name, "threshold": threshold, "direction": "<=", "value": value, "judged_on": "point estimate"}
    if value is None:
        return {**out, "status": UNDECIDED, "note": f"{name} was not measured (forgetting off, or no latency run)"}
    return {**out, "status": MET if value <= threshold else NOT_MET}


def judge_targets(targets: dict[str, float], metrics, scores: dict[str, list[float]], results: dict) -> list[dict]:
    """Every target of ``eval.targets`` judged on the finetuned model's scores and measured figures."""
    by_name = {m.name: m for m in metrics}
    out = []
    for name, threshold in targets.items():
        if name in OPERATIONAL:
            out.append(judge_operational(name, threshold, results))
        else:
            out.append(judge_metric(name, threshold, scores[name], by_name[name].higher_is_better))
    return out


def gate(headline: dict, targets: list[dict], against: str) -> dict:
    """The release gate: the candidate fails if it is significantly worse than ``against`` on any metric
    (the paired 95% interval of the difference entirely on the wrong side of 0) or misses a target."""
    worse = []
    for name, m in headline.items():
        lo, hi = m["delta_ci95"]
        if (m["higher_is_better"] and hi < 0) or (not m["higher_is_better"] and lo > 0):
            worse.append(f"{name} {m['delta']:+.3f} (95% CI {lo:+.3f}..{hi:+.3f}) vs {against}")
    missed = [f"target {t['target']} {t['direction']} {t['threshold']} {t['status']}" for t in targets
              if t["status"] != MET]
    failures = worse + missed
    return {"against": against, "passed": not failures, "failures": failures,
            "verdict": "PASS" if not failures else "FAIL: " + "; ".join(failures)}
