"""Continuous batching: one model worker thread steps every active sequence one frame at a time.

Each active sequence owns a row of one backbone KV cache and its own cache position (per-row slots,
``elise.model.blocks``), so sequences join and leave at any time. At every ``chunk``-frame boundary
the worker decodes the new frames of every sequence (the codec's streaming decoder, one row per
sequence), hands each job its audio, retires the sequences that ended (EOS, frame limit, a client
that left, the time limit) and admits waiting ones (a one-row prefill into a free row), up to
``max_batch``. Active rows stay packed at the front of the cache (a retired row takes the last one's
place), so a step computes only the active rows.

A job is one request: its text pieces (sentences) run one after the other in the same row, each
prompted by the voice and the previous piece (``Synthesizer.prompt``, the engine's prompts), with
the engine's pause between them. Each job samples from its own ``torch.Generator`` seeded with its
seed, so its codes do not depend on which other jobs share its steps.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from elise.codec.base import Codec
from elise.generate import FrameGenerator, SamplingConfig
from elise.layout import EOS_CODE, NUM_CODEBOOKS
from elise.synthesis import Segment, SynthesisError, Synthesizer

log = logging.getLogger(__name__)

Sink = Callable[[object], None]  # receives audio chunks (float32 [n]), then DONE or an exception
DONE = object()


class QueueFull(RuntimeError):
    """More requests wait than ``max_queue``."""


class TimeLimit(RuntimeError):
    """A job ran past its time limit."""


@dataclass
class Job:
    """One request in the worker: its pieces, voice, sampling and where its audio goes."""

    pieces: list[str]
    speaker: int | str
    context: list[Segment]
    sampling: SamplingConfig
    seed: int
    sink: Sink
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_audio: float | None = None  # seconds from submit to the first audio chunk
    samples: int = 0  # audio samples handed out
    spoken: list[tuple[Tensor, bool]] = field(default_factory=list)  # per ended piece: (codes [32, n], EOS)
    # progress of the current piece
    piece: int = -1
    previous: Segment | None = None
    frame: int = 0
    limit: int = 0
    floor: int = 0
    codes: list[Tensor] = field(default_factory=list)  # this piece's speech frames [32] each
    pending: list[Tensor] = field(default_factory=list)  # frames not decoded yet
    codec_row: int = -1
    timed_out: bool = False
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled.set()


class Batcher:
    """The model worker. ``submit`` queues a job; ``start``/``stop`` run the worker thread."""

    def __init__(self, synth: Synthesizer, max_batch: int = 16, max_queue: int = 64,
                 max_positions: int = 2048, chunk_frames: int = 4,
                 on_step: Callable[[int], None] | None = None):  # fmt: skip
        self.synth, self.model, self.codec = synth, synth.model, synth.codec
        self.max_batch, self.max_queue, self.chunk = int(max_batch), int(max_queue), max(1, int(chunk_frames))
        self.max_len = min(int(max_positions), self.model.cfg.backbone.max_seq_len)
        self.on_step = on_step
        self.gen = FrameGenerator(self.model, self.max_batch, self.max_len, SamplingConfig())
        self.cache, self.depth_cache = self.gen.backbone_cache, self.gen.decoder_cache
        self.device = self.gen.device
        self.lengths = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)  # per row
        self.h = torch.zeros(self.max_batch, self.model.cfg.backbone.dim, device=self.device,
                             dtype=next(self.model.parameters()).dtype)  # fmt: skip
        self.rows: list[Job] = []  # active jobs, row i of the cache = rows[i]
        self.between: list[Job] = []  # jobs whose piece ended: next piece or done at the boundary
        self.waiting: collections.deque[Job] = collections.deque()
        self.calls: collections.deque[tuple[Callable[[], object], Future]] = collections.deque()
        self.cond = threading.Condition()
        self.codec_rows = [True] * self.max_batch  # free rows of the streaming decoder
        self.stateful = type(self.codec).streaming_decoder is not Codec.streaming_decoder
        if self.stateful and not hasattr(self.codec, "reset_streaming_rows"):
            raise SynthesisError(f"codec {self.codec.identity}: a streaming state without a per-row reset")
        self.pause = torch.zeros(round(synth.settings.pause_ms / 1000 * synth.sample_rate))
        self.thread: threading.Thread | None = None
        self.running = False
        self.steps = 0

    # ---- the request side ------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return len(self.waiting)

    def active(self) -> int:
        return len(self.rows)

    def submit(self, job: Job) -> Job:
        """Queue ``job``; QueueFull when ``max_queue`` jobs already wait."""
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
            self.waiting.append(job)
            self.cond.notify()
        return job

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the worker between two steps (its result or error in the Future): anything else
        that uses the model or the codec (encoding an uploaded voice), whose streaming state the worker
        holds, goes through here."""
        future: Future = Future()
        with self.cond:
            if not self.running:
                raise RuntimeError("the model worker is not running")
            self.calls.append((fn, future))
            self.cond.notify()
        return future

    def _run_calls(self) -> None:
        with self.cond:
            calls, self.calls = list(self.calls), collections.deque()
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as err:  # the caller's error, handed back
                future.set_exception(err)

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._run, name="elise-batcher", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)
        for job in [*self.rows, *self.between, *self.waiting]:
            job.sink(RuntimeError("the server is shutting down"))
        self.rows, self.between = [], []
        self.waiting.clear()
        for _fn, future in self.calls:
            future.set_exception(RuntimeError("the server is shutting down"))
        self.calls.clear()

    # ---- the worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        decoder = contextlib.ExitStack()
        step = decoder.enter_context(self.codec.streaming_decoder(self.max_batch)) if self.stateful else None
        try:
            with torch.inference_mode():
                while True:
                    with self.cond:
                        while self.running and not (self.rows or self.between or self.waiting or self.calls):
                            self.cond.wait()
                        if not self.running:
                            return
                    self._run_calls()
                    self._boundary(step)
                    for _ in range(self.chunk):
                        if not self.rows:
                            break
                        self._step()
        except BaseException as err:  # a broken worker fails every job, never hangs them
            log.exception("model worker failed")
            for job in [*self.rows, *self.between, *self.waiting]:
                job.sink(err)
            self.rows, self.between = [], []
            self.waiting.clear()
            self.running = False
        finally:
            decoder.close()

    def _boundary(self, step: Callable[[Tensor], Tensor] | None) -> None:
        """Decode pending frames, hand out audio, retire finished jobs, admit new pieces and jobs."""
        now = time.perf_counter()
        for i in reversed(range(len(self.rows))):
            job = self.rows[i]
            if job.cancelled.is_set() or now > job.deadline:
                job.timed_out = not job.cancelled.is_set()
                self._retire(i)
                self.between.append(job)
        self._decode(step, [*self.rows, *self.between])
        between, self.between = self.between, []
        for job in between:
            if job.cancelled.is_set():
                self._free(job)
            elif job.timed_out or (job.piece + 1 < len(job.pieces) and now > job.deadline):
                self._free(job)
                job.sink(TimeLimit("the request ran past the server's time limit"))
            elif job.piece + 1 < len(job.pieces):
                self._emit(job, self.pause)
                self._admit(job)
            else:
                self._free(job)
                job.sink(DONE)
        while len(self.rows) < self.max_batch:
            with self.cond:
                if not self.waiting:
                    break
                job = self.waiting.popleft()
            if job.cancelled.is_set():
                continue
            if now > job.deadline:
                job.sink(TimeLimit("the request waited past the server's time limit"))
                continue
            job.codec_row = self.codec_rows.index(True)
            self.codec_rows[job.codec_row] = False
            job.generator = torch.Generator(device=self.device).manual_seed(job.seed)
            self._admit(job)

    def _free(self, job: Job) -> None:
        if job.codec_row >= 0:
            self.codec_rows[job.codec_row] = True
            job.codec_row = -1

    def _admit(self, job: Job) -> None:
        """Prefill ``job``'s next piece into the next free row (a failing prompt fails only this job)."""
        job.piece += 1
        try:
            piece = job.pieces[job.piece]
            (tokens, mask), limit, floor = self.synth.prompt(
                piece, job.speaker, job.previous, None, job.context
            )
            if tokens.shape[0] >= self.max_len:
                raise SynthesisError(
                    f"the prompt takes {tokens.shape[0]} of the server's {self.max_len} positions"
                )
        except SynthesisError as err:
            self._free(job)
            job.sink(err)
            return
        job.limit, job.floor = min(limit, self.max_len - tokens.shape[0]), floor
        job.frame, job.codes = 0, []
        r = len(self.rows)
        x = self.model.embed_rows(tokens[None].to(self.device), mask[None].to(self.device))  # [1, S, Db]
        h = self.model.backbone(x, None, self.cache.rows(r, r + 1))  # [1, S, Db]
        self.h[r], self.lengths[r] = h[0, -1], tokens.shape[0]
        self.rows.append(job)
        if self.stateful:  # a fresh decoder state per piece, as the engine's
            reset = torch.zeros(self.max_batch, dtype=torch.bool)
            reset[job.codec_row] = True
            self.codec.reset_streaming_rows(reset)  # type: ignore[attr-defined,operator]

    def _retire(self, i: int) -> None:
        """Free row ``i``: the last active row moves into it."""
        last = len(self.rows) - 1
        if i != last:
            n = int(self.lengths[last])
            self.cache.k[:, i, :, :n] = self.cache.k[:, last, :, :n]
            self.cache.v[:, i, :, :n] = self.cache.v[:, last, :, :n]
            self.h[i], self.lengths[i] = self.h[last], self.lengths[last]
            self.rows[i] = self.rows[last]
        self.rows.pop()

    def _step(self) -> None:
        """One frame for every active row: codebook 0 + depth decoder, then the backbone step."""
        n = len(self.rows)
        codes = torch.empty(n, NUM_CODEBOOKS, dtype=torch.long, device=self.device)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(self.rows):
            s = job.sampling
            groups.setdefault((s.temperature, s.top_k, s.depth_temperature), []).append(i)
        for idx in groups.values():
            first = self.rows[idx[0]]
            gen = self.gen
            gen.sampling, gen.depth_sampling = first.sampling, first.sampling.depth()
            gen.decoder_cache = self.depth_cache.rows(0, len(idx))
            gen.generator = [self.rows[i].generator for i in idx]  # type: ignore[misc]
            allow = torch.tensor([self.rows[i].frame >= self.rows[i].floor for i in idx], device=self.device)
            index = torch.tensor(idx, device=self.device)
            codes[index] = gen.decode_frame(self.h[:n][index], allow)
        cpu = codes.cpu()
        eos = (cpu == EOS_CODE).all(-1)  # [n]
        ended = []
        for i, job in enumerate(self.rows):
            job.frame += 1
            if not bool(eos[i]):
                job.codes.append(cpu[i])
                job.pending.append(cpu[i])
            if bool(eos[i]) or job.frame >= job.limit:
                ended.append(i)
        self.steps += 1
        if self.on_step is not None:
            self.on_step(n)
        self._advance(codes)  # every row (an ended row's step is wasted, but the rows stay in order)
        for i in reversed(ended):
            job = self.rows[i]
            done = bool(eos[i])
            if not done:
                log.warning(
                    "a piece reached its frame limit (%d frames) without end-of-speech; cut there", job.limit
                )
            codes = (
                torch.stack(job.codes, dim=1)
                if job.codes
                else torch.zeros(NUM_CODEBOOKS, 0, dtype=torch.long)
            )
            job.spoken.append((codes, done))
            keep = self.synth.settings.carry_context and done and job.codes
            job.previous = Segment(job.pieces[job.piece], job.speaker, codes) if keep else None
            self._retire(i)
            self.between.append(job)

    def _advance(self, codes: Tensor) -> None:
        """Feed each row's frame [n, 32] back at its own position (per-row slots)."""
        n = codes.shape[0]
        ids = codes + self.model.audio_offsets  # [n, 32]
        x = F.embedding_bag(ids, self.model.audio_embeddings.weight, mode="sum")[:, None]  # [n, 1, Db]
        pos = self.lengths[:n]  # [n] the slot each row writes
        end = int(pos.max()) + 1
        backbone = self.model.backbone
        cos, sin = backbone.rope(pos[:, None], 0, 1, x.dtype)  # [n, 1, 1, hd]
        keys = torch.arange(end, device=self.device)
        mask = (keys[None, :] <= pos[:, None])[:, None, None, :]  # [n, 1, 1, end]
        k, v = self.cache.k[:, :n, :, :end], self.cache.v[:, :n, :, :end]
        h = backbone.step(x, cos, sin, k, v, pos[:, None], mask)  # [n, 1, Db]
        self.h[:n] = h[:, -1]
        self.lengths[:n] += 1

    def _decode(self, step: Callable[[Tensor], Tensor] | None, jobs: list[Job]) -> None:
        """Decode every job's pending frames (one codec row each) and hand the audio out."""
        jobs = [j for j in jobs if j.pending]
        if not jobs:
            return
        spf = self.codec.samples_per_frame
        t = max(len(j.pending) for j in jobs)
        if step is not None:  # stateful: one call over the decoder's fixed batch, idle rows decode silence
            codes = torch.zeros(self.max_batch, NUM_CODEBOOKS, t, dtype=torch.long)
            for j in jobs:
                codes[j.codec_row, :, : len(j.pending)] = torch.stack(j.pending, dim=1)
            wav = step(codes)  # [max_batch, 1, t * spf]
            out = {id(j): wav[j.codec_row, 0] for j in jobs}
        else:
            codes = torch.zeros(len(jobs), NUM_CODEBOOKS, t, dtype=torch.long)
            for b, j in enumerate(jobs):
                codes[b, :, : len(j.pending)] = torch.stack(j.pending, dim=1)
            wav = self.codec.decode(codes.to(self.device))  # [B, 1, t * spf]
            out = {id(j): wav[b, 0] for b, j in enumerate(jobs)}
        for j in jobs:
            audio = out[id(j)][: len(j.pending) * spf].float().cpu()
            j.pending = []
            self._emit(j, audio)

    def _emit(self, job: Job, audio: Tensor) -> None:
        if job.cancelled.is_set():
            return
        if job.first_audio is None:
            job.first_audio = time.perf_counter() - job.submitted
        job.samples += audio.numel()
        job.sink(audio)
