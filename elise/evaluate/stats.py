"""Bootstrap intervals: a metric's mean with its 95 % interval, and the paired difference of two runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000


def _clean(values: Sequence[float | None]) -> np.ndarray:
    return np.array([float(v) for v in values if v is not None and np.isfinite(float(v))], dtype=np.float64)


def mean_interval(values: Sequence[float | None], resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """``{"mean", "low", "high", "n"}``: the mean and its 95 % percentile-bootstrap interval (None values
    left out; an empty list gives None figures)."""
    x = _clean(values)
    if x.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)  # [resamples]
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high), "n": int(x.size)}


def paired_difference(
    a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0
) -> dict:
    """Mean of ``b - a`` over paired items, its 95 % paired-bootstrap interval, and ``significant``:
    the interval excludes 0 (a difference of exactly 0 everywhere is never significant)."""
    x = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)  # [pairs]
    if x.size == 0:
        return {"diff": None, "low": None, "high": None, "n": 0, "significant": False}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    low, high = (float(v) for v in np.percentile(means, [2.5, 97.5]))
    return {"diff": float(x.mean()), "low": low, "high": high, "n": int(x.size),
            "significant": bool(low > 0 or high < 0)}  # fmt: skip
