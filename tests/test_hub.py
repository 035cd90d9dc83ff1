"""elise.hub: HF_HUB_OFFLINE read at call time, and one quick metadata call instead of download retries."""

from __future__ import annotations

import pytest

from elise import hub


def test_offline_setting_is_read_when_asked_and_skips_the_network(monkeypatch):
    def no_network(*_a, **_k):
        raise AssertionError("the hub was called although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(hub, "check", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline()
    assert hub.reachable("openai/whisper-large-v3") == "HF_HUB_OFFLINE is set"


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_an_unreachable_hub_is_one_line_reason(online, monkeypatch):
    calls = []

    def unreachable(repo, kind="model", timeout=10.0):
        calls.append((repo, kind, timeout))
        raise ConnectionError("Failed to resolve\n  'huggingface.co'")

    monkeypatch.setattr(hub, "check", unreachable)
    assert not hub.offline()
    assert hub.reachable("org/ds", "dataset") == "ConnectionError: Failed to resolve 'huggingface.co'"
    assert calls == [("org/ds", "dataset", 10.0)]


def test_check_asks_model_or_dataset_metadata_with_a_timeout(online, monkeypatch):
    import huggingface_hub

    asked = []

    class Api:
        def model_info(self, repo, timeout):
            asked.append(("model", repo, timeout))

        def dataset_info(self, repo, timeout):
            asked.append(("dataset", repo, timeout))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    assert hub.reachable("a/m") is None
    hub.check("a/d", "dataset", timeout=3)
    assert asked == [("model", "a/m", 10.0), ("dataset", "a/d", 3)]
