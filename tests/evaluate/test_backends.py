"""``auto`` backends: the local cache, then the hub only when it answers, else the offline backend."""

from __future__ import annotations

import logging

import pytest

from elise.evaluate import backends
from elise.evaluate.backends import BackendUnavailable, hub_or_offline


def loader(calls: list, works: set[bool]):
    def hub_model(local_only: bool) -> str:
        calls.append(local_only)
        if local_only not in works:
            raise BackendUnavailable(f"cannot load (local_only={local_only})")
        return "hub"

    return hub_model


@pytest.mark.parametrize(
    ("works", "reason", "expected", "calls"),
    [
        ({True}, None, "hub", [True]),  # cached: no hub call at all
        ({False}, None, "hub", [True, False]),  # not cached, hub answers: downloaded
        ({False}, "ConnectionError: no route", "offline", [True]),  # hub silent: no download retries
        (set(), None, "offline", [True, False]),  # hub answers but the model does not load
    ],
)
def test_auto_prefers_the_hub_model_and_never_waits_on_an_unreachable_hub(
    monkeypatch, caplog, works, reason, expected, calls
):
    from elise import hub

    monkeypatch.setattr(hub, "reachable", lambda repo, kind="model", timeout=10.0: reason)
    seen: list[bool] = []
    with caplog.at_level(logging.WARNING, logger="elise.evaluate"):
        got = hub_or_offline("asr", "org/model", loader(seen, works), lambda: "offline", "not comparable")
    assert (got, seen) == (expected, calls)
    warned = [r.getMessage() for r in caplog.records]
    assert (warned == []) == (expected == "hub")
    if expected == "offline":
        assert warned[0].startswith("asr=auto: ") and warned[0].endswith("not comparable")


def test_a_local_directory_that_does_not_load_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    from elise import hub

    monkeypatch.setattr(hub, "reachable", lambda *a, **k: pytest.fail("asked the hub for a local folder"))
    seen: list[bool] = []
    assert hub_or_offline("sim", str(tmp_path), loader(seen, set()), lambda: "offline", "x") == "offline"
    assert seen == [True]


def test_to_16k_resamples_mixes_down_and_clips():
    import numpy as np

    stereo = np.full((24_000, 2), [0.2, 0.6], dtype=np.float32)  # 1 s at 24 kHz
    out = backends.to_16k(stereo, 24_000)
    assert out.dtype == np.float32 and out.shape == (16_000,)
    assert np.allclose(out[100:-100], 0.4, atol=1e-3)  # the channels' mean
    assert np.allclose(backends.to_16k(np.full(16_000, 3.0), 16_000), 1.0)  # clipped to [-1, 1]
