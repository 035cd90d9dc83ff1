"""``POST /v1/audio/dialogue`` (an elise extension): a script of ``<speaker>: <text>`` turns in, the
conversation's audio (and its timeline) out.

``elise.synthesis.dialogue.converse`` plans every turn exactly as ``synthesize.py dialogue=...`` does
(the speakers' voice prompts, then the earlier turns' text and generated codes within the server's
positions, the seed of turn k ``seed + k + 1``), and each turn runs in the model worker as a job like a
speech request: the worker stays the only thread that touches the model and the codec (Mimi's streaming
state included), a turn shares the batch with other requests, and the queue and time limits apply.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from pydantic import BaseModel

from elise.generate import SamplingConfig
from elise.serve.batcher import DONE, Job
from elise.serve.errors import ApiError
from elise.serve.formats import FORMATS, STREAMING
from elise.serve.voices import VoiceError
from elise.synthesis import SynthesisError, Synthesizer
from elise.synthesis.dialogue import (
    Conversation,
    Generate,
    OnAudio,
    Script,
    TurnResult,
    Voice,
    converse,
    parse_script,
    timeline,
)
from elise.synthesis.engine import OnChunk, Request, Result

JSON = "json"  # response_format: {"audio": base64 <audio_format>, "timeline": ...}
MAX_PAUSE_MS = 10_000


class DialogueRequest(BaseModel):
    """The body: ``script`` (turns, one a line), ``voices`` (script speaker -> a server voice name)."""

    model: str = "elise"
    script: str
    voices: dict[str, str] | None = None
    response_format: str = "wav"
    audio_format: str = "wav"  # the audio inside a response_format=json body
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    pause_ms: float | None = None
    overlap_ms: float | None = None  # each turn starts this long before the previous one ends (not streamed)
    context_turns: int | None = None
    stream_format: str | None = None  # audio: bytes as made (wav, pcm); sse: audio deltas + turn events


@dataclass
class Plan:
    """A checked dialogue request: its script, voices, planning Synthesizer and sampling."""

    script: Script
    voices: dict[str, Voice]
    planner: Synthesizer
    sampling: SamplingConfig
    seed: int
    context_turns: int | None
    overlap_ms: float = 0.0


def check(server: Any, body: DialogueRequest) -> Plan:
    """A dialogue request -> its Plan; ApiError 400 naming the parameter (or the script line) when bad."""
    if len(body.script) > server.limits.max_input_chars:
        raise ApiError(400, f"script has {len(body.script)} characters; the limit is "
                       f"{server.limits.max_input_chars}", "script", "input_too_long")  # fmt: skip
    if body.response_format not in (*FORMATS, JSON):
        raise ApiError(400, f"response_format={body.response_format!r}: use one of {', '.join(FORMATS)} or json",
                       "response_format")  # fmt: skip
    if body.audio_format not in FORMATS:
        raise ApiError(
            400, f"audio_format={body.audio_format!r}: use one of {', '.join(FORMATS)}", "audio_format"
        )
    if body.stream_format not in (None, "audio", "sse"):
        raise ApiError(400, f"stream_format={body.stream_format!r}: use audio or sse (or leave it out)",
                       "stream_format")  # fmt: skip
    if body.stream_format is not None and body.response_format not in STREAMING:
        raise ApiError(400, f"stream_format={body.stream_format} streams {' or '.join(STREAMING)}, not "
                       f"response_format={body.response_format}", "response_format")  # fmt: skip
    s = server.synth.settings
    pause = s.pause_ms if body.pause_ms is None else float(body.pause_ms)
    if not 0 <= pause <= MAX_PAUSE_MS:
        raise ApiError(400, f"pause_ms={pause}: use 0 to {MAX_PAUSE_MS}", "pause_ms")
    overlap = 0.0 if body.overlap_ms is None else float(body.overlap_ms)
    if not 0 <= overlap <= MAX_PAUSE_MS:
        raise ApiError(400, f"overlap_ms={overlap}: use 0 to {MAX_PAUSE_MS}", "overlap_ms")
    if overlap and body.stream_format is not None:
        raise ApiError(400, "overlap_ms needs the whole conversation (leave stream_format out): streamed "
                       "audio is sent before the next turn exists", "overlap_ms")  # fmt: skip
    if body.context_turns is not None and body.context_turns < 0:
        raise ApiError(400, f"context_turns={body.context_turns}: use 0 or more (null: all that fit)",
                       "context_turns")  # fmt: skip
    try:
        script = parse_script(body.script, "script")
    except SynthesisError as err:
        raise ApiError(400, str(err), "script", "malformed_script") from err
    voices = resolve(server, script, body.voices or {})
    sampling, seed = server.sampling(body.temperature, body.top_k, body.seed)
    planner = Synthesizer(server.synth.model, server.synth.tokenizer, server.synth.codec,
                          replace(s, seed=seed, pause_ms=pause, batch_size=1), server.synth.speakers)  # fmt: skip
    planner.max_len = server.batcher.max_len  # the worker's positions, not only the model's
    return Plan(script, voices, planner, sampling, seed, body.context_turns, overlap)


def resolve(server: Any, script: Script, names: dict[str, str]) -> dict[str, Voice]:
    """Every script speaker -> a Voice: ``names[speaker]`` (a server voice), else the speaker itself as a
    voice name (an uploaded voice, ``default``, a checkpoint speaker name) or speaker id."""
    speakers = {t.speaker: t.line for t in reversed(script.turns)}  # speaker -> its first line
    extra = sorted(set(names) - set(speakers))
    if extra:
        raise ApiError(400, f"voices names {extra[0]!r}, who has no turn in the script", "voices")
    out = {}
    for speaker, line in sorted(speakers.items(), key=lambda kv: kv[1]):
        try:
            voice = server.voices.get(names.get(speaker, speaker))
            out[speaker] = Voice(speaker, voice.speaker, prompt=list(voice.context))
            continue
        except VoiceError as err:
            if speaker in names:
                raise ApiError(400, f"voices.{speaker}: {err}", "voices", "unknown_voice") from err
        try:
            out[speaker] = Voice(speaker, server.synth.speaker_id(speaker))
        except SynthesisError as err:
            raise ApiError(400, f"script line {line}: unknown speaker {speaker!r}: not a voice of this server "
                           f"(GET /v1/audio/voices) nor a speaker of the checkpoint ({err})", "script",
                           "unknown_voice") from err  # fmt: skip
    return out


class Stopped(RuntimeError):
    """The conversation was stopped (its client left)."""


def worker(
    server: Any, sampling: SamplingConfig, deadline: float, stop: threading.Event | None = None
) -> Generate:
    """``converse``'s ``generate``: each request becomes a model-worker job; waits for their audio
    (``stop`` set: cancels them and raises Stopped)."""

    def get(q: queue.Queue) -> Any:
        while True:
            if stop is not None and stop.is_set():
                raise Stopped("the conversation was stopped")
            try:
                return q.get(timeout=0.5)
            except queue.Empty:
                pass

    def generate(requests: list[Request], on_chunk: OnChunk | None) -> list[Result]:
        waits: list[tuple[Job, queue.Queue]] = []
        results = []
        try:  # every submitted job is cancelled on the way out, also when a later submit fails
            for r in requests:
                assert r.speaker is not None and r.seed is not None  # converse sets both
                q: queue.Queue = queue.Queue()
                job = Job(server.synth.pieces(r), r.speaker, list(r.context or []), sampling, int(r.seed),
                          q.put, deadline)  # fmt: skip
                server.batcher.submit(job)
                waits.append((job, q))
            for i, (job, q) in enumerate(waits):
                chunks = []
                while (item := get(q)) is not DONE:
                    if isinstance(item, BaseException):
                        raise item
                    chunks.append(item)
                    if on_chunk is not None:
                        on_chunk(i, item)
                audio = torch.cat(chunks) if chunks else torch.zeros(0)
                pieces, eos = [c for c, _ in job.spoken], [e for _, e in job.spoken]
                results.append(Result(audio, server.synth.sample_rate, pieces, eos, {"seed": job.seed}))
        finally:
            for job, _ in waits:
                job.cancel()  # a no-op once done; frees the rows of the others on an error
        return results

    return generate


def run(server: Any, plan: Plan, deadline: float, on_audio: OnAudio | None = None,
        on_turn: Callable[[int, TurnResult], None] | None = None, stop: threading.Event | None = None) -> Conversation:  # fmt: skip
    """Generate the conversation (blocking: call it off the event loop); with ``on_audio`` streamed
    (the joined audio chunk by chunk, pauses included) and ``on_turn`` after each turn."""
    return converse(plan.planner, [plan.script], plan.voices, plan.context_turns, on_audio is not None,
                    on_audio, on_turn, plan.overlap_ms, worker(server, plan.sampling, deadline, stop))[0]  # fmt: skip


def sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def sse_audio(data: bytes) -> bytes:
    return sse({"type": "dialogue.audio.delta", "audio": base64.b64encode(data).decode()})


def body_json(plan: Plan, conv: Conversation, audio: str, audio_format: str) -> dict[str, Any]:
    """The ``response_format=json`` body: base64 audio and the timeline."""
    return {
        "object": "audio.dialogue", "audio": audio, "audio_format": audio_format,
        "sample_rate": plan.planner.sample_rate, "seed": plan.seed, "timeline": timeline_of(plan, conv),
    }  # fmt: skip


def timeline_of(plan: Plan, conv: Conversation) -> dict[str, Any]:
    """``synthesize.py``'s timeline.json of the conversation."""
    return timeline(plan.script, conv.turns, plan.planner.sample_rate, plan.planner.settings.pause_ms,
                    overlap_ms=plan.overlap_ms)  # fmt: skip
