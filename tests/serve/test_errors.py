"""Bad requests get their status code in OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serve.test_speech import client

OK = {"model": "elise", "input": "Hello there.", "voice": "default", "response_format": "wav"}


def post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60, **kw)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": "   "}, "input"),
        ({"input": "x" * 5000}, "input"),
        ({"voice": "nobody"}, "voice"),
        ({"voice": "../etc/passwd"}, "voice"),
        ({"response_format": "ogg"}, "response_format"),
        ({"stream_format": "chunks"}, "stream_format"),
        ({"speed": 2.0}, "speed"),
        ({"temperature": -1}, "temperature"),
        ({"input": None}, "input"),
    ],
)
def test_bad_speech_requests_are_400_with_the_openai_error_shape(served, change, param):
    url, _ = served
    r = post(url, {**OK, **change})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_the_openai_client_sees_a_bad_request_error(served):
    url, _ = served
    with pytest.raises(openai.BadRequestError, match="input has 5000 characters"):
        client(url).audio.speech.create(model="elise", voice="default", input="x" * 5000)


def test_bad_uploads_are_refused_and_nothing_escapes_voices_dir(served):
    url, server = served
    form = {"name": "ok_name", "transcript": "Words."}
    not_audio = {"file": ("x.wav", b"this is not audio", "audio/wav")}
    r = httpx.post(f"{url}/v1/audio/voices", data=form, files=not_audio)
    assert r.status_code == 400 and "uploaded audio" in r.json()["error"]["message"]
    for name in ("../evil", "a/b", ".hidden", "x" * 65):
        r = httpx.post(f"{url}/v1/audio/voices", data={**form, "name": name}, files=not_audio)
        assert r.status_code == 400, name
        assert httpx.delete(f"{url}/v1/audio/voices/{name}").status_code in (400, 404)
    assert not list(server.voices.dir.parent.glob("evil*"))
    server.limits.max_upload_bytes = 10
    try:
        r = httpx.post(f"{url}/v1/audio/voices", data=form, files=not_audio)
        assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    finally:
        server.limits.max_upload_bytes = 10 * 2**20
    assert httpx.get(f"{url}/health").status_code == 200


def test_api_key_missing_or_wrong_is_401_right_key_passes(served):
    url, server = served
    server.limits.api_key = "s3cret"
    try:
        assert post(url, OK).status_code == 401
        assert post(url, OK, headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert [m.id for m in client(url, "s3cret").models.list()] == ["elise"]
        assert post(url, OK, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # health and metrics stay open
    finally:
        server.limits.api_key = None


def test_full_queue_is_503_with_retry_after(served):
    url, server = served
    server.batcher.max_queue = 0
    try:
        r = post(url, OK)
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
    finally:
        server.batcher.max_queue = 64
    assert post(url, OK).status_code == 200


def test_time_limit_is_504(served):
    url, server = served
    server.limits.time_limit_s = 0.0
    try:
        r = post(url, OK)
        assert r.status_code == 504 and r.json()["error"]["code"] == "time_limit"
    finally:
        server.limits.time_limit_s = 300.0
    assert post(url, OK).status_code == 200


def test_a_whole_file_format_that_fails_midway_is_an_error_not_a_short_200(served, monkeypatch):
    """mp3/flac/opus are sent complete: a failure after the first audio is the failure's status."""
    from elise.serve.batcher import TimeLimit

    url, server = served
    make_job = server.job

    def failing_after_first_chunk(body, sink):
        sent = []

        def relay(item):
            if sent:  # the first chunk goes through; whatever follows becomes the time limit
                item = TimeLimit("ran past its time limit") if len(sent) == 1 else None
            if item is not None:
                sent.append(item)
                sink(item)

        return make_job(body, relay)

    monkeypatch.setattr(server, "job", failing_after_first_chunk)
    r = post(url, {**OK, "response_format": "flac", "input": "Hello there. How are you today?"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "time_limit"
    monkeypatch.undo()
    assert post(url, {**OK, "response_format": "flac"}).status_code == 200
