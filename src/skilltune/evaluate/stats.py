"""Small statistics for reports: percentiles and paired bootstrap intervals."""

from __future__ import annotations

import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def bootstrap_delta(base: list[float], tuned: list[float], n: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float, float]:
    """Mean of (tuned - base) over paired examples, with a bootstrap confidence interval."""
    if not base:
        return 0.0, 0.0, 0.0
    diff = np.asarray(tuned, dtype=float) - np.asarray(base, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n, len(diff)))
    means = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(diff.mean()), float(lo), float(hi)


def bootstrap_mean(values: list[float], n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    if not values:
        return 0.0, 0.0, 0.0
    arr = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(arr), size=(n, len(arr)))
    lo, hi = np.quantile(arr[idx].mean(axis=1), [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(arr.mean()), float(lo), float(hi)
