"""The official openai client against a running server: every format, streaming, SSE, voices, models."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf
from openai import OpenAI

SR = 24_000


def client(url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768, SR
    wav, sr = sf.read(io.BytesIO(data), dtype="float32")
    return wav, sr


@pytest.mark.parametrize("fmt", ["wav", "pcm", "flac", "mp3", "opus"])
def test_every_format_decodes_at_24k_with_a_sensible_duration(served, fmt):
    url, _ = served
    resp = client(url).audio.speech.create(model="elise", voice="default", input="Hello there.",
                                           response_format=fmt, extra_body={"seed": 3})  # fmt: skip
    wav, sr = decode(resp.content, fmt)
    assert sr == SR
    # one piece, cut at max_audio_seconds=1.0: 13 frames of 1920 samples (lossy codecs pad a little)
    assert 0.9 < wav.size / sr < 1.2, wav.size / sr
    assert np.abs(wav).max() > 0.001


def test_streaming_response_sends_bytes_as_they_come_and_equals_the_whole(served):
    url, _ = served
    speech = client(url).audio.speech
    text = "First sentence here. And a second one follows."
    with speech.with_streaming_response.create(model="elise", voice="default", input=text, response_format="pcm",
                                               extra_body={"seed": 5}) as resp:  # fmt: skip
        assert resp.headers["x-elise-seed"] == "5"
        parts = list(resp.iter_bytes())
    assert len(parts) > 1  # streamed in several chunks
    whole = speech.create(model="elise", voice="default", input=text, response_format="pcm",
                          extra_body={"seed": 5}).content  # fmt: skip
    assert b"".join(parts) == whole
    # two pieces of 13 frames + the 150 ms pause
    assert len(whole) // 2 == 2 * 13 * 1920 + 3600


def test_sse_events_carry_base64_audio_then_done(served):
    url, _ = served
    body = {"model": "elise", "input": "Hello there.", "voice": "default", "response_format": "pcm",
            "stream_format": "sse", "seed": 3}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] == 13
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    plain = httpx.post(f"{url}/v1/audio/speech", json={**body, "stream_format": "audio"}, timeout=60).content
    assert audio == plain


def test_models_health_and_page(served):
    url, _ = served
    assert [m.id for m in client(url).models.list()] == ["elise"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "/v1/audio/speech" in page.text


def test_voice_upload_use_list_delete(served, tmp_path, monkeypatch):
    import threading

    from testkit import tone

    url, server = served
    encoded_on = []
    add = server.voices.add

    def recorded_add(*args):
        encoded_on.append(threading.current_thread().name)
        return add(*args)

    monkeypatch.setattr(server.voices, "add", recorded_add)
    buf = io.BytesIO()
    sf.write(buf, tone(1.5, sr=16_000), 16_000, format="WAV")
    files = {"file": ("me.wav", buf.getvalue(), "audio/wav")}
    r = httpx.post(f"{url}/v1/audio/voices", data={"name": "me_1", "transcript": "A tone."}, files=files)
    assert r.status_code == 200, r.text
    assert (server.voices.dir / "me_1.npy").is_file()  # encoded once, kept as plain int16 codes
    assert encoded_on == [
        "elise-batcher"
    ]  # the codec is used by the model worker only (Mimi's streaming state)
    names = [v["name"] for v in httpx.get(f"{url}/v1/audio/voices").json()["data"]]
    assert "me_1" in names and "default" in names
    resp = client(url).audio.speech.create(
        model="elise", voice="me_1", input="Hello there.", response_format="wav"
    )
    assert decode(resp.content, "wav")[0].size == 13 * 1920
    assert httpx.delete(f"{url}/v1/audio/voices/me_1").status_code == 200
    assert httpx.delete(f"{url}/v1/audio/voices/me_1").status_code == 404
    assert "me_1" not in [v["name"] for v in httpx.get(f"{url}/v1/audio/voices").json()["data"]]


def test_a_request_without_seed_gets_the_server_seed_or_a_random_one(served):
    url, server = served
    body = {"model": "elise", "input": "Hello there.", "voice": "default", "response_format": "pcm"}
    seeds = {
        httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60).headers["x-elise-seed"] for _ in range(2)
    }
    assert len(seeds) == 2  # random each time
    server.limits.seed = 9
    try:
        r = httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60)
        assert r.headers["x-elise-seed"] == "9"
        assert r.content == httpx.post(f"{url}/v1/audio/speech", json={**body, "seed": 9}, timeout=60).content
    finally:
        server.limits.seed = None
