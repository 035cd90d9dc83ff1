"""Bootstrap intervals and the paired difference."""

from __future__ import annotations

import numpy as np

from elise.evaluate.stats import mean_interval, paired_difference


def test_mean_interval_holds_the_mean_and_narrows_with_more_data() -> None:
    rng = np.random.default_rng(1)
    small, large = mean_interval(rng.normal(0.3, 0.1, 10)), mean_interval(rng.normal(0.3, 0.1, 400))
    for s in (small, large):
        assert s["low"] <= s["mean"] <= s["high"]
    assert large["high"] - large["low"] < small["high"] - small["low"]
    assert abs(large["mean"] - 0.3) < 0.02
    assert mean_interval([None, 1.0, float("nan")])["n"] == 1
    assert mean_interval([])["mean"] is None


def test_paired_difference_is_significant_only_for_a_real_gap() -> None:
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 1, 50)
    same = paired_difference(a, a)
    assert same["diff"] == 0 and not same["significant"]
    worse = paired_difference(a, a + rng.uniform(0.1, 0.3, 50))
    assert worse["significant"] and worse["low"] > 0
    noisy = paired_difference(a, a + rng.normal(0, 0.3, 50) * 0.01)  # tiny symmetric jitter
    assert not noisy["significant"]
