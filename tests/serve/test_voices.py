"""Stored voices on the server: one reader (``elise.synthesis.stored``, shared with ``synthesize.py
voices=<folder>``), reads under the store's lock, unreadable files a 400 naming the voice."""

from __future__ import annotations

import threading

import httpx
import torch

from elise.synthesis.dialogue import read_voices
from elise.synthesis.stored import StoredVoice, write_stored


def speak(url: str, voice: str) -> httpx.Response:
    body = {"model": "elise", "input": "Hello.", "voice": voice, "response_format": "pcm"}
    return httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60)


def test_a_read_waits_for_a_write_in_progress_and_sees_the_whole_voice(served):
    _url, server = served
    store = server.voices
    codes = torch.arange(32 * 3).reshape(32, 3)
    write_stored(store.dir, "held", StoredVoice("Hi there.", 0, store.codec_identity(), codes))
    got: list = []
    try:
        with store.lock:  # a write or delete in progress
            reader = threading.Thread(target=lambda: got.append(store.get("held")))
            reader.start()
            reader.join(0.3)
            assert got == []  # the read waits for it
        reader.join(10)
        [voice] = got
        assert voice.text == "Hi there." and torch.equal(voice.context[0].codes, codes)
        # the same files are a voice of synthesize.py voices=<folder> (the same reader)
        assert torch.equal(read_voices(str(store.dir))["held"].stored.codes, codes)
    finally:
        store.delete("held")


def test_an_unreadable_stored_voice_is_a_400_naming_it(served):
    url, server = served
    (server.voices.dir / "broken.json").write_text("{not json")
    (server.voices.dir / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    try:
        r = speak(url, "broken")
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "voice" and "cannot read voice 'broken'" in err["message"]
        assert "\n" not in err["message"]
        assert speak(url, "default").status_code == 200  # the server goes on
    finally:
        server.voices.delete("broken")


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    """A write that fails (a full disk) leaves neither the voice nor its temporary file in the folder."""
    import numpy as np
    import pytest

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(OSError, match="No space left"):
        write_stored(tmp_path, "v", StoredVoice("Hi.", 0, "tiny", torch.zeros(32, 2, dtype=torch.long)))
    assert list(tmp_path.iterdir()) == []
