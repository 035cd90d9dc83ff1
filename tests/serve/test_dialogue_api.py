"""``POST /v1/audio/dialogue`` on the session's server (tiny model and codec, turns cut at 1 s): the audio
matches the timeline, it equals ``synthesize.py``'s conversation for the seed, same seed same bytes,
bad scripts are 400s naming the line, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import replace

import httpx
import numpy as np
import pytest
import soundfile as sf
from testkit import record_bases

from elise.synthesis import Synthesizer
from elise.synthesis.dialogue import Voice, converse, parse_script

SPF, SR = 1920, 24_000
SCRIPT = "# two speakers\n0: Hello there.\n1: Hi! How are you?\n\n0: Fine, thanks."


def post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/audio/dialogue", json=body, timeout=120, **kw)


def test_a_two_speaker_script_gives_audio_as_long_as_its_timeline(served):
    url, _ = served
    r = post(url, {"script": SCRIPT, "seed": 3, "response_format": "json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-elise-seed"] == "3" and r.headers["x-elise-turns"] == "3"
    wav, sr = sf.read(io.BytesIO(base64.b64decode(body["audio"])), dtype="float32")
    tl = body["timeline"]
    turns = tl["turns"]
    assert sr == SR and body["audio_format"] == "wav" and body["seed"] == 3
    assert [(t["turn"], t["line"], t["speaker"], t["speaker_id"]) for t in turns] == [
        (1, 2, "0", 0), (2, 3, "1", 1), (3, 5, "0", 0)
    ]  # fmt: skip
    assert [t["context"] for t in turns] == [[], [1], [1, 2]]  # every earlier turn is in the prompt
    assert [t["seed"] for t in turns] == [4, 5, 6]  # seed + k + 1, as synthesize.py
    pause = round(0.150 * SR)
    assert wav.size == sum(t["frames"] for t in turns) * SPF + 2 * pause  # turns + pauses, nothing else
    assert wav.size == round(tl["seconds"] * SR)
    for a, b in zip(turns, turns[1:], strict=False):
        assert b["start"] == pytest.approx(a["end"] + 0.150, abs=1e-4)
    assert turns[1]["prompt_rows"] > turns[0]["prompt_rows"] + turns[0]["frames"]  # turn 1's codes joined


def test_the_same_seed_gives_the_same_bytes_and_the_engines_conversation(served):
    url, server = served
    body = {"script": SCRIPT, "seed": 11, "response_format": "pcm", "pause_ms": 40}
    first, second = post(url, body), post(url, body)
    assert first.status_code == 200 and first.content == second.content
    assert post(url, {**body, "seed": 12}).content != first.content
    # synthesize.py's conversation (the engine, not the worker) for the same seed: the same audio
    synth = server.synth
    engine = Synthesizer(synth.model, synth.tokenizer, synth.codec,
                         replace(synth.settings, seed=11, pause_ms=40), synth.speakers)  # fmt: skip
    voices = {"0": Voice("0", 0), "1": Voice("1", 1)}
    conv = converse(engine, [parse_script(SCRIPT, "script")], voices)[0]
    served_audio = np.frombuffer(first.content, dtype="<i2").astype(np.float32) / 32767
    expected = np.clip(conv.audio(SR).numpy(), -1, 1)
    assert served_audio.shape == expected.shape
    assert np.abs(served_audio - expected).max() <= 1.5 / 32767  # pcm16 rounding only


def test_overlapping_turns_equal_the_engines_overlapping_conversation(served):
    url, server = served
    body = {"script": SCRIPT, "seed": 11, "response_format": "json", "audio_format": "pcm", "overlap_ms": 200}
    r = post(url, body)
    assert r.status_code == 200, r.text
    tl = r.json()["timeline"]
    assert tl["overlap_ms"] == 200 and tl["pause_ms"] == 0.0
    turns = tl["turns"]
    for a, b in zip(turns, turns[1:], strict=False):
        assert b["start"] == pytest.approx(a["end"] - 0.2, abs=1e-4)  # each turn starts 200 ms early
    synth = server.synth
    engine = Synthesizer(
        synth.model, synth.tokenizer, synth.codec, replace(synth.settings, seed=11), synth.speakers
    )
    conv = converse(engine, [parse_script(SCRIPT, "script")], {"0": Voice("0", 0), "1": Voice("1", 1)},
                    overlap_ms=200)[0]  # fmt: skip
    served_audio = np.frombuffer(base64.b64decode(r.json()["audio"]), dtype="<i2").astype(np.float32) / 32767
    expected = np.clip(conv.audio(SR).numpy(), -1, 1)
    assert (
        served_audio.shape == expected.shape == (sum(t["frames"] for t in turns) * SPF - 2 * round(0.2 * SR),)
    )
    assert np.abs(served_audio - expected).max() <= 1.5 / 32767


def test_streamed_conversations_equal_the_whole_and_sse_carries_the_timeline(served):
    url, _ = served
    body = {"script": SCRIPT, "seed": 21, "response_format": "pcm"}
    whole = post(url, body)
    with httpx.stream(
        "POST", f"{url}/v1/audio/dialogue", json={**body, "stream_format": "audio"}, timeout=120
    ) as r:
        assert r.status_code == 200 and r.headers["x-elise-seed"] == "21"
        parts = list(r.iter_bytes())
    assert len(parts) > 3 and b"".join(parts) == whole.content  # turn by turn, the same audio
    r = post(url, {**body, "stream_format": "sse"})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "dialogue.done" and kinds.count("dialogue.turn") == 3
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "dialogue.audio.delta")
    assert audio == whole.content
    turns = [e["turn"] for e in events if e["type"] == "dialogue.turn"]
    assert turns == events[-1]["timeline"]["turns"] and [t["turn"] for t in turns] == [1, 2, 3]
    # each turn event follows that turn's audio: the audio before it reaches the turn's end
    before = [sum(len(base64.b64decode(e["audio"])) for e in events[:i] if e["type"] == "dialogue.audio.delta")
              for i, e in enumerate(events) if e["type"] == "dialogue.turn"]  # fmt: skip
    assert before == [2 * round(t["end"] * SR) for t in turns]
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_client_that_leaves_a_streamed_conversation_stops_it(served):
    url, server = served
    turns = 40  # 40 x 13 frames: far more than the worker steps in the client's 1 s and the 0.5 s poll
    script = "\n".join(f"{i % 2}: Turn number {i} of a long talk." for i in range(turns))
    body = {"script": script, "seed": 2, "response_format": "pcm", "stream_format": "audio"}
    steps = server.batcher.steps
    with httpx.stream("POST", f"{url}/v1/audio/dialogue", json=body, timeout=120) as r:
        next(r.iter_bytes())  # the first audio, then the client goes away
    left = time.time()
    while any(t.name == "elise-dialogue" for t in threading.enumerate()) or server.batcher.active():
        assert time.time() < left + 60, "the conversation kept running after its client left"
        time.sleep(0.05)
    # 12 turns of 13 frames = 156 worker steps when nobody leaves (~5 s here); it stops within a turn or two
    assert server.batcher.steps - steps < 40
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_client_that_leaves_a_whole_conversation_stops_it(served):
    url, server = served
    turns = 40  # 40 x 13 frames: far more than the worker steps in the client's 1 s and the 0.5 s poll
    script = "\n".join(f"{i % 2}: Turn number {i} of a long talk." for i in range(turns))
    steps = server.batcher.steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/audio/dialogue", json={"script": script, "response_format": "pcm"}, timeout=1.0)
    left, seen = time.time(), -1
    while seen != server.batcher.steps or server.batcher.active():  # until the worker is idle for 2 s
        assert time.time() < left + 60, "the conversation kept running after its client left"
        seen = server.batcher.steps
        time.sleep(2.0)
    assert server.batcher.steps - steps < turns * 13 // 2  # 520 steps when nobody leaves (~65 seen here)
    assert httpx.get(f"{url}/health").status_code == 200


def test_server_voices_speak_the_turns(served, tmp_path):
    from testkit import tone

    url, server = served
    buf = io.BytesIO()
    sf.write(buf, tone(1.5, sr=16_000), 16_000, format="WAV")
    files = {"file": ("v.wav", buf.getvalue(), "audio/wav")}
    assert httpx.post(f"{url}/v1/audio/voices", data={"name": "dlg_bob", "transcript": "A tone."},
                      files=files).status_code == 200  # fmt: skip
    try:
        script = "alice: Good morning.\nbob: Morning to you."
        r = post(url, {"script": script, "voices": {"alice": "default", "bob": "dlg_bob"}, "seed": 1,
                       "response_format": "json", "context_turns": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        turns = r.json()["timeline"]["turns"]
        assert [t["speaker"] for t in turns] == ["alice", "bob"] and turns[1]["context"] == []
        # every turn's prompt holds the uploaded voice's codes (alice's default voice has none)
        voice_frames = np.load(server.voices.dir / "dlg_bob.npy").shape[1]
        for t in turns:
            assert t["prompt_rows"] > voice_frames + len("A tone.") + len(t["text"]), t
        r = post(url, {"script": script, "voices": {"alice": "default"}})  # bob: no voice, no speaker
        assert r.status_code == 400 and "script line 2: unknown speaker 'bob'" in r.json()["error"]["message"]
    finally:
        httpx.delete(f"{url}/v1/audio/voices/dlg_bob")


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        ({"script": "0: Hello.\nno colon here"}, "script", "script line 2: no colon"),
        ({"script": "# c\n\n0: Hello.\n: no speaker"}, "script", "script line 4: no speaker"),
        ({"script": "0: Hello.\n1:   "}, "script", "script line 2: speaker '1' has no text"),
        ({"script": "# only a comment"}, "script", "no turns"),
        ({"script": "x" * 5000}, "script", "5000 characters"),
        ({"voices": {"0": "nobody"}}, "voices", "voices.0: unknown voice 'nobody'"),
        ({"voices": {"carol": "default"}}, "voices", "'carol', who has no turn"),
        ({"response_format": "ogg"}, "response_format", "response_format='ogg'"),
        ({"response_format": "json", "audio_format": "json"}, "audio_format", "audio_format='json'"),
        ({"pause_ms": -1}, "pause_ms", "pause_ms=-1"),
        ({"overlap_ms": -5}, "overlap_ms", "overlap_ms=-5"),
        (
            {"overlap_ms": 200, "stream_format": "audio", "response_format": "pcm"},
            "overlap_ms",
            "leave stream_format out",
        ),
        ({"context_turns": -2}, "context_turns", "context_turns=-2"),
        ({"temperature": 9}, "temperature", "temperature=9"),
        ({"stream_format": "chunks"}, "stream_format", "stream_format='chunks'"),
        ({"stream_format": "sse", "response_format": "mp3"}, "response_format", "not response_format=mp3"),
        (
            {"stream_format": "audio", "response_format": "json"},
            "response_format",
            "not response_format=json",
        ),
        ({"script": None}, "script", "script"),
    ],
)
def test_bad_dialogue_requests_are_400_naming_the_line_or_parameter(served, change, param, message):
    url, _ = served
    r = post(url, {"script": "0: Hello.\n1: Hi.", **change})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and message in err["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_the_api_key_guards_the_dialogue_route(served):
    url, server = served
    server.limits.api_key = "sekret"
    try:
        assert post(url, {"script": "0: Hi."}).status_code == 401
        ok = post(
            url, {"script": "0: Hi.", "response_format": "pcm"}, headers={"Authorization": "Bearer sekret"}
        )
        assert ok.status_code == 200 and len(ok.content) == 2 * 13 * SPF
    finally:
        server.limits.api_key = None


def test_serve_passes_base_to_the_loader(tiny_ckpt, monkeypatch):
    from elise.config import compose
    from elise.serve.app import Server

    seen = record_bases(monkeypatch)
    server = Server.from_config(compose("serve", [f"ckpt={tiny_ckpt}", "codec=tiny", "base=/some/base.ckpt"]))
    server.close()
    assert seen == ["/some/base.ckpt"]
