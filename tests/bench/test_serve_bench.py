"""The serving load test on the tiny preset: every case measured, max_batch=16 against 1."""

from __future__ import annotations

import pytest

from elise.bench.serve import bench_serve, pct, serve_rows


def test_pct_is_nearest_rank():
    assert pct([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0 and pct([1.0, 2.0, 3.0, 4.0], 0.95) == 4.0
    assert pct([5.0], 0.95) == 5.0


@pytest.mark.slow
def test_bench_serve_tiny_measures_every_case():
    res = bench_serve(quick=True, preset="tiny", clients=(1, 2))
    assert {(r["max_batch"], r["clients"]) for r in res["rows"]} == {(16, 1), (16, 2), (1, 1), (1, 2)}
    for r in res["rows"]:
        assert r["audio_s"] == pytest.approx(r["requests"] * 4 * 0.08, abs=0.01)  # 4 frames each
        assert 0 < r["ttfb_p50"] <= r["latency_p95"]
        assert r["prefill_s"] > 0 and r["frame_s"] > 0 and r["decode_s"] >= 0  # the worker's time by phase
        assert r["prefill_s"] + r["frame_s"] + r["decode_s"] <= r["wall_s"] + 0.05  # one worker thread
    assert all(row["vs max_batch=1"] for row in serve_rows(res))
