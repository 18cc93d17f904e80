"""`skilltune monitor NAME`: volume, errors, latency and input drift from the request log.

Drift compares what users send with what the model was trained on: the prompt-length
distributions (Kolmogorov-Smirnov statistic) and the vocabulary (share of request
words never seen in training). The larger of the two is the drift score, flagged
above ``serve.drift_threshold``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from skilltune.data.reader import load_examples
from skilltune.serve.requestlog import RequestLog

_WORD = re.compile(r"[a-z0-9']+")


def _ks(a: list[int], b: list[int]) -> float:
    if not a or not b:
        return 0.0
    xs = np.sort(np.concatenate([a, b]))
    ca = np.searchsorted(np.sort(a), xs, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), xs, side="right") / len(b)
    return float(np.max(np.abs(ca - cb)))


def drift(train_prompts: list[str], live_prompts: list[str]) -> dict:
    vocab = {w for p in train_prompts for w in _WORD.findall(p.lower())}
    live_words = [w for p in live_prompts for w in _WORD.findall(p.lower())]
    oov = sum(w not in vocab for w in live_words) / len(live_words) if live_words else 0.0
    ks = _ks([len(_WORD.findall(p.lower())) for p in train_prompts], [len(_WORD.findall(p.lower())) for p in live_prompts])
    return {"length_ks": round(ks, 3), "oov_rate": round(oov, 3), "score": round(max(ks, oov), 3)}


MIN_REQUESTS = 20  # below this a distribution comparison says nothing


def summarize(log: RequestLog | Path, train_file: str | None, threshold: float) -> dict:
    rows = (log if isinstance(log, RequestLog) else RequestLog(log)).rows()
    n = len(rows)
    errors = sum(r["status"] >= 400 for r in rows)
    lat = [r["latency_s"] for r in rows if r["status"] < 400]
    out = {"requests": n, "error_rate": errors / n if n else 0.0,
           "by_class": {c: sum(status_class(r["status"]) == c for r in rows)
                        for c in sorted({status_class(r["status"]) for r in rows})},
           "latency_p50_s": float(np.percentile(lat, 50)) if lat else None,
           "latency_p95_s": float(np.percentile(lat, 95)) if lat else None,
           "versions": sorted({r["version"] for r in rows}),
           "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows), "drift": None}
    if train_file and Path(train_file).is_file() and rows:
        train_prompts = [ex.turns[-2].content for ex in load_examples(train_file) if len(ex.turns) >= 2]
        live = [r["prompt"] for r in rows if r["status"] < 400]
        d = drift(train_prompts, live)
        enough = len(live) >= MIN_REQUESTS
        d.update(threshold=threshold, flagged=enough and d["score"] > threshold, requests=len(live),
                 note="" if enough else f"only {len(live)} successful requests; drift needs {MIN_REQUESTS}+")
        out["drift"] = d
    return out


def status_class(status: int) -> str:
    """The class a logged status counts under: ok, 4xx, 429, 499 (client left), 5xx, 504 (time-out)."""
    if status < 400:
        return "ok"
    if status in (429, 499, 504):
        return str(status)
    return "5xx" if status >= 500 else "4xx"


def windows(rows: list[dict], window_s: float) -> list[dict]:
    """Per time window: volume, error rate, errors by class, latency percentiles (oldest first)."""
    if not rows:
        return []
    start = min(r["ts"] for r in rows)
    buckets: dict[int, list[dict]] = {}
    for r in rows:
        buckets.setdefault(int((r["ts"] - start) // window_s), []).append(r)
    out = []
    for k in range(max(buckets) + 1):
        rs = buckets.get(k, [])
        classes: dict[str, int] = {}
        for r in rs:
            classes[status_class(r["status"])] = classes.get(status_class(r["status"]), 0) + 1
        lat = [r["latency_s"] for r in rs if r["status"] < 400]
        errors = sum(v for c, v in classes.items() if c not in ("ok", "429", "499"))
        out.append({"start": start + k * window_s, "requests": len(rs), "errors": errors,
                    "error_rate": errors / len(rs) if rs else 0.0, "by_class": classes,
                    "rate_limited": classes.get("429", 0),
                    "latency_p50_s": float(np.percentile(lat, 50)) if lat else None,
                    "latency_p95_s": float(np.percentile(lat, 95)) if lat else None})
    return out


SPIKE_MIN_ERRORS = 5  # fewer errors than this in a window never page anyone


def spike(wins: list[dict]) -> dict | None:
    """The latest window, if its error rate jumped: >= 5 errors and more than twice the earlier windows' rate
    plus 5 points (errors here are server-side and client mistakes, not 429s or clients that left)."""
    if not wins:
        return None
    last, earlier = wins[-1], wins[:-1]
    before = sum(w["errors"] for w in earlier) / max(sum(w["requests"] for w in earlier), 1)
    if last["errors"] >= SPIKE_MIN_ERRORS and last["error_rate"] > 2 * before + 0.05:
        return {"window_start": last["start"], "error_rate": last["error_rate"], "before": before,
                "errors": last["errors"], "by_class": last["by_class"]}
    return None
