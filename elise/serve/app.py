"""The OpenAI-compatible speech server: FastAPI routes over one ``Batcher`` (the model worker).

``POST /v1/audio/speech`` (OpenAI's request shape; extensions ``seed``, ``temperature``, ``top_k``),
``POST /v1/audio/dialogue`` (an elise extension: a conversation script, ``elise.serve.dialogue``),
``GET/POST /v1/audio/voices``, ``DELETE /v1/audio/voices/{name}``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` and the page at ``/``. Errors use OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}``; with ``api_key`` set every ``/v1`` route needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel

from elise.generate import SamplingConfig
from elise.serve import dialogue as conversation
from elise.serve.batcher import DONE, Batcher, Job, QueueFull, TimeLimit
from elise.serve.dialogue import DialogueRequest
from elise.serve.errors import ApiError
from elise.serve.formats import FORMATS, STREAMING, StreamEncoder, encode, media_type
from elise.serve.metrics import Metrics
from elise.serve.voices import VoiceError, VoiceStore
from elise.synthesis import Request as SynthRequest
from elise.synthesis import SynthesisError, Synthesizer

log = logging.getLogger("elise.serve")


class SpeechRequest(BaseModel):
    """OpenAI's ``/v1/audio/speech`` body, plus ``seed``, ``temperature`` and ``top_k``."""

    model: str = "elise"
    input: str
    voice: str | dict[str, Any] = "default"
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str = "audio"
    instructions: str | None = None
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None


@dataclass
class Limits:
    max_input_chars: int = 4096
    time_limit_s: float = 300.0
    max_upload_bytes: int = 10 * 2**20
    api_key: str | None = None
    model_name: str = "elise"
    seed: int | None = None  # the seed of requests without one (None: a random one each)


class Server:
    """The loaded model, its worker, voices, metrics and limits (``load`` then ``app``)."""

    def __init__(self, synth: Synthesizer, batcher: Batcher, voices: VoiceStore, metrics: Metrics,
                 limits: Limits):  # fmt: skip
        self.synth, self.batcher, self.voices, self.metrics, self.limits = (
            synth,
            batcher,
            voices,
            metrics,
            limits,
        )
        self.ready = False

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Server:
        """Load the checkpoint and codec once, start the model worker (not warmed yet)."""
        from elise.synthesize import settings_from

        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        gen_keys = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(gen_keys, dict)
        settings = settings_from(OmegaConf.create({**gen_keys, "batch_size": 1, "seed": cfg.seed or 0}))
        codec = gen_keys.get("codec")
        synth = Synthesizer.load(str(cfg.ckpt or ""), codec, str(cfg.device), str(cfg.dtype), cfg.quantize,
                                 settings=settings, base=cfg.get("base"))  # fmt: skip
        if synth.codec.random_weights:
            log.warning("codec %s has RANDOM weights: the audio it decodes is noise", synth.codec.identity)
        metrics = Metrics()
        batcher = Batcher(synth, int(cfg.max_batch), int(cfg.max_queue), int(cfg.max_positions),
                          settings.stream_chunk_frames, on_step=metrics.step, on_time=metrics.worker_time,
                          first_chunk_frames=int(cfg.get("first_chunk_frames", 1)),
                          admit_window_s=float(cfg.get("admit_window_ms", 0)) / 1000)  # fmt: skip
        voices = VoiceStore(synth, cfg.voices_dir, float(cfg.reference_max_seconds))
        limits = Limits(int(cfg.max_input_chars), float(cfg.time_limit_s), int(float(cfg.max_upload_mb) * 2**20),
                        str(cfg.api_key) if cfg.api_key else None, str(cfg.model_name),
                        None if cfg.seed is None else int(cfg.seed))  # fmt: skip
        server = cls(synth, batcher, voices, metrics, limits)
        batcher.start()
        return server

    def warm_up(self) -> None:
        """Generate until the first audio of a short request (every code path once), then ready (with the
        worker idle again: the first requests do not wait for the warm-up's frames)."""
        first = threading.Event()
        job = Job(["Warm up."], self.synth.speaker_id(self.synth.settings.speaker), [], SamplingConfig(), 0,
                  lambda _item: first.set(), time.perf_counter() + 600)  # fmt: skip
        self.batcher.submit(job)
        first.wait(timeout=600)
        job.cancel()
        deadline = time.perf_counter() + 60  # the worker retires it at its next frame: idle when ready
        while self.batcher.active() and time.perf_counter() < deadline:
            time.sleep(0.01)
        self.ready = True

    def close(self) -> None:
        self.batcher.stop()

    # ---- requests --------------------------------------------------------------------------------
    def job(self, body: SpeechRequest, sink) -> Job:
        """Check a speech request (ApiError 400 on a bad one) and turn it into a worker job."""
        text = body.input
        if not text or not text.strip():
            raise ApiError(400, "input is empty", "input", "empty_input")
        if len(text) > self.limits.max_input_chars:
            raise ApiError(400, f"input has {len(text)} characters; the limit is {self.limits.max_input_chars}",
                           "input", "input_too_long")  # fmt: skip
        if body.response_format not in FORMATS:
            raise ApiError(400, f"response_format={body.response_format!r}: use one of {', '.join(FORMATS)}",
                           "response_format")  # fmt: skip
        if body.stream_format not in ("audio", "sse"):
            raise ApiError(400, f"stream_format={body.stream_format!r}: use audio or sse", "stream_format")
        if body.speed != 1.0:
            raise ApiError(
                400, "speed other than 1.0 is not supported by this server (no time-stretch)", "speed"
            )
        voice_name = body.voice.get("id") if isinstance(body.voice, dict) else body.voice
        try:
            voice = self.voices.get(str(voice_name))
        except VoiceError as err:
            raise ApiError(400, str(err), "voice", "unknown_voice") from err
        sampling, seed = self.sampling(body.temperature, body.top_k, body.seed)
        try:
            pieces = self.synth.pieces(SynthRequest(text))
        except SynthesisError as err:
            raise ApiError(400, str(err), "input") from err
        return Job(pieces, voice.speaker, voice.context, sampling, seed, sink,
                   time.perf_counter() + self.limits.time_limit_s)  # fmt: skip

    def sampling(
        self, temperature: float | None, top_k: int | None, seed: int | None
    ) -> tuple[SamplingConfig, int]:
        """A request's sampling and seed (None: the server's; no seed anywhere: a random one); 400s when bad."""
        s = self.synth.settings
        temperature = s.temperature if temperature is None else temperature
        top_k = s.top_k if top_k is None else top_k
        if not 0.0 <= temperature <= 5.0:
            raise ApiError(400, f"temperature={temperature}: use 0 to 5", "temperature")
        if top_k < 0:
            raise ApiError(400, f"top_k={top_k}: use 0 (all codes) or more", "top_k")
        seed = self.limits.seed if seed is None else int(seed)
        seed = secrets.randbelow(2**31) if seed is None else seed
        return SamplingConfig(float(temperature), int(top_k), s.depth_temperature), seed

    def check_key(self, request: Request) -> None:
        key = self.limits.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(
                401, "missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key"
            )


class ClientGone(ConnectionError):
    """The client disconnected."""


async def next_item(q: asyncio.Queue, request: Request, job: Job) -> object:
    """The next item of ``job``'s queue; a client that leaves cancels the job (ClientGone)."""
    while True:
        try:
            return await asyncio.wait_for(q.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return ClientGone("the client disconnected")


def app(server: Server) -> FastAPI:
    """The FastAPI application over a loaded ``server``."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        server.close()

    api = FastAPI(title="elise speech server", lifespan=lifespan)
    auth = Depends(server.check_key)
    sr = server.synth.sample_rate

    @api.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError) -> JSONResponse:
        server.metrics.errors.labels(str(err.status)).inc()
        return err.response()

    @api.exception_handler(RequestValidationError)
    async def bad_body(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return await api_error(
            _request, ApiError(400, f"{param}: {first.get('msg', 'invalid request')}", param)
        )

    @api.get("/health")
    async def health() -> JSONResponse:
        ok = server.ready and server.batcher.running
        status = "ok" if ok else ("loading" if not server.ready else "worker stopped")
        return JSONResponse({"status": status, "active": server.batcher.active(),
                             "queued": server.batcher.queue_depth()}, status_code=200 if ok else 503)  # fmt: skip

    @api.get("/metrics")
    async def metrics() -> Response:
        server.metrics.queue_depth.set(server.batcher.queue_depth())
        server.metrics.active.set(server.batcher.active())
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models", dependencies=[auth])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.limits.model_name, "object": "model",
                                            "created": 0, "owned_by": "elise"}]}  # fmt: skip

    @api.get("/v1/audio/voices", dependencies=[auth])
    async def list_voices() -> dict:
        return {"object": "list", "data": server.voices.names()}

    @api.post("/v1/audio/voices", dependencies=[auth])
    async def add_voice(name: Annotated[str, Form()], file: Annotated[UploadFile, File()],
                        transcript: Annotated[str, Form()], speaker: Annotated[str | None, Form()] = None) -> dict:  # fmt: skip
        limit = server.limits.max_upload_bytes
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise ApiError(
                413, f"the upload exceeds {limit} bytes (max_upload_mb)", "file", "upload_too_large"
            )
        try:
            # on the worker: Mimi's encoder shares the streaming state the worker's decoder holds
            voice = await asyncio.wrap_future(
                server.batcher.call(lambda: server.voices.add(name, data, transcript, speaker))
            )
        except VoiceError as err:
            raise ApiError(err.status, str(err), "file") from err
        return {"name": voice.name, "kind": voice.kind, "text": voice.text}

    @api.delete("/v1/audio/voices/{name}", dependencies=[auth])
    async def delete_voice(name: str) -> dict:
        try:
            server.voices.delete(name)
        except VoiceError as err:
            raise ApiError(err.status, str(err), "name") from err
        return {"name": name, "deleted": True}

    def error_of(err: BaseException, param: str) -> ApiError:
        """A generation failure as its response: 499 client gone, 503 queue full, 504 time limit, 400 bad
        ``param`` (the text or script), else 500."""
        if isinstance(err, QueueFull):
            server.metrics.requests.labels("rejected").inc()
            return ApiError(503, str(err), code="queue_full", headers={"Retry-After": "2"})
        if isinstance(err, ClientGone | conversation.Stopped):
            server.metrics.requests.labels("cancelled").inc()
            return ApiError(499, str(err), code="client_closed")
        server.metrics.requests.labels("error").inc()
        if isinstance(err, TimeLimit):
            return ApiError(504, str(err), code="time_limit")
        if isinstance(err, SynthesisError):
            return ApiError(400, str(err), param)
        return ApiError(500, f"generation failed: {err}")

    @api.post("/v1/audio/speech", dependencies=[auth])
    async def speech(body: SpeechRequest, request: Request) -> Response:
        if not server.ready:
            raise ApiError(503, "the model is still loading", headers={"Retry-After": "5"})
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        job = server.job(body, lambda item: loop.call_soon_threadsafe(q.put_nowait, item))
        try:
            server.batcher.submit(job)
        except QueueFull as err:
            raise error_of(err, "input") from err
        first = await next_item(q, request, job)
        if isinstance(first, BaseException):
            raise error_of(first, "input")
        fmt = body.response_format
        headers = {"x-elise-seed": str(job.seed), "x-elise-sample-rate": str(sr)}

        async def chunks() -> AsyncIterator[tuple[bytes, bool]]:
            """(bytes, last) pieces of the encoded audio; the job is cancelled if the client leaves."""
            enc = StreamEncoder(fmt, sr)
            item: object = first
            ok = False
            try:
                while item is not DONE:
                    if isinstance(item, BaseException):
                        log.warning("request stopped: %s", item)
                        break
                    assert isinstance(item, torch.Tensor)
                    data = enc.write(item.numpy().astype(np.float32))
                    if data:
                        yield data, False
                    item = await next_item(q, request, job)
                else:
                    ok = True
                yield enc.close(), True
            finally:
                job.cancel()  # a no-op once done; frees the row if the client left
                finish(job, ok)

        if body.stream_format == "sse":

            async def events() -> AsyncIterator[bytes]:
                async for data, last in chunks():
                    if data:
                        delta = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
                        yield f"data: {json.dumps(delta)}\n\n".encode()
                    if last:
                        frames = round(job.samples / server.synth.codec.samples_per_frame)
                        usage = {"input_tokens": len(body.input), "output_tokens": frames,
                                 "total_tokens": len(body.input) + frames}  # fmt: skip
                        yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n".encode()

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

        async def audio() -> AsyncIterator[bytes]:
            async for data, _last in chunks():
                if data:
                    yield data

        if fmt in STREAMING:
            return StreamingResponse(audio(), media_type=media_type(fmt), headers=headers)
        # a whole file: complete, or the failure's status (never a 200 with the audio cut short)
        enc, item = StreamEncoder(fmt, sr), first
        try:
            parts = []
            while item is not DONE:
                if isinstance(item, BaseException):
                    raise error_of(item, "input")
                assert isinstance(item, torch.Tensor)
                parts.append(enc.write(item.numpy().astype(np.float32)))
                item = await next_item(q, request, job)
            parts.append(enc.close())
        finally:
            job.cancel()
            finish(job, item is DONE)
        return Response(b"".join(parts), media_type=media_type(fmt), headers=headers)

    def dialogue_done(t0: float, samples: int) -> None:
        server.metrics.requests.labels("ok").inc()
        server.metrics.audio_seconds.inc(samples / sr)
        if samples:
            server.metrics.rtf.observe((time.perf_counter() - t0) / (samples / sr))

    @api.post("/v1/audio/dialogue", dependencies=[auth])
    async def dialogue(body: DialogueRequest, request: Request) -> Response:
        """A conversation (elise extension): script turns in, the joined audio (+ timeline) out."""
        if not server.ready:
            raise ApiError(503, "the model is still loading", headers={"Retry-After": "5"})
        plan = conversation.check(server, body)
        t0 = time.perf_counter()
        deadline = t0 + server.limits.time_limit_s
        headers = {"x-elise-seed": str(plan.seed), "x-elise-sample-rate": str(sr)}
        if body.stream_format is not None:
            return await dialogue_stream(body, plan, request, deadline, headers)
        stop = threading.Event()
        task = asyncio.ensure_future(
            asyncio.to_thread(conversation.run, server, plan, deadline, None, None, stop)
        )
        while not task.done():  # a client that leaves stops the conversation
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                stop.set()
        try:
            conv = task.result()
        except Exception as err:  # worker failures and shutdown too: the OpenAI error shape
            raise error_of(err, "script") from err
        wav = conv.audio(sr).numpy().astype(np.float32)
        dialogue_done(t0, wav.size)
        headers["x-elise-turns"] = str(len(conv.turns))
        if body.response_format == conversation.JSON:
            audio = base64.b64encode(encode(wav, sr, body.audio_format)).decode()
            return JSONResponse(conversation.body_json(plan, conv, audio, body.audio_format), headers=headers)
        return Response(encode(wav, sr, body.response_format), media_type=media_type(body.response_format),
                        headers=headers)  # fmt: skip

    async def dialogue_stream(body: DialogueRequest, plan: conversation.Plan, request: Request, deadline: float,
                              headers: dict[str, str]) -> Response:  # fmt: skip
        """The conversation's audio as it is made (turn by turn, pauses included); ``sse`` adds a
        ``dialogue.turn`` event after each turn and ``dialogue.done`` with the timeline."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(q.put_nowait, item)

        def work() -> None:
            try:
                put(
                    conversation.run(server, plan, deadline, lambda _c, a: put(a), lambda _c, t: put(t), stop)
                )
            except BaseException as err:  # handed to the response
                put(err)

        async def next_event() -> object:
            while True:
                try:
                    return await asyncio.wait_for(q.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        stop.set()
                        return ClientGone("the client disconnected")

        t0 = time.perf_counter()
        threading.Thread(target=work, name="elise-dialogue", daemon=True).start()
        first = await next_event()
        if isinstance(first, BaseException):
            stop.set()
            raise error_of(first, "script")
        sse = body.stream_format == "sse"

        async def events() -> AsyncIterator[bytes]:
            enc, item, samples = StreamEncoder(body.response_format, sr), first, 0
            try:
                while not isinstance(item, conversation.Conversation):
                    if isinstance(item, BaseException):
                        log.warning("conversation stopped: %s", item)
                        return
                    if isinstance(item, torch.Tensor):
                        samples += item.numel()
                        data = enc.write(item.numpy().astype(np.float32))
                        if data:
                            yield conversation.sse_audio(data) if sse else data
                    elif sse and isinstance(item, conversation.TurnResult):
                        yield conversation.sse({"type": "dialogue.turn", "turn": item.timeline()})
                    item = await next_event()
                tail = enc.close()
                if tail:
                    yield conversation.sse_audio(tail) if sse else tail
                dialogue_done(t0, samples)
                if sse:
                    yield conversation.sse({"type": "dialogue.done", "seed": plan.seed,
                                            "timeline": conversation.timeline_of(plan, item)})  # fmt: skip
            finally:
                stop.set()  # a no-op once done; stops the conversation if the client left

        media = "text/event-stream" if sse else media_type(body.response_format)
        return StreamingResponse(events(), media_type=media, headers=headers)

    def finish(job: Job, ok: bool) -> None:
        m = server.metrics
        m.requests.labels("ok" if ok else "cancelled").inc()
        seconds = job.samples / sr
        m.audio_seconds.inc(seconds)
        if job.first_audio is not None:
            m.ttfb.observe(job.first_audio)
        if ok and seconds > 0:
            m.rtf.observe((time.perf_counter() - job.submitted) / seconds)

    @api.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("elise.serve").joinpath("static/index.html").read_text("utf-8"))

    return api


def main(cfg: DictConfig) -> None:
    """``python serve.py``'s body: load, warm up, serve until Ctrl-C; a user error is one line, exit 2."""
    import uvicorn

    from elise.checkpoints import CheckpointError
    from elise.codec import CodecUnavailable
    from elise.errors import exit_with

    try:
        server = Server.from_config(cfg)
    except (SynthesisError, CheckpointError, CodecUnavailable, OSError) as err:
        exit_with(err)
    server.warm_up()
    log.info("ready: http://%s:%d (max_batch=%d)", cfg.host, int(cfg.port), server.batcher.max_batch)
    uvicorn.run(app(server), host=str(cfg.host), port=int(cfg.port), log_level=str(cfg.log_level))
