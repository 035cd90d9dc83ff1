"""Continuous batching: one model worker thread steps every active sequence one frame at a time.

Each active sequence owns a row of one backbone KV cache and its own cache position (per-row slots of
``FrameGenerator``), so sequences join and leave between any two frames. Before every frame the worker
retires the sequences that ended (EOS, frame limit, a client that left, the time limit) and admits
waiting ones, up to ``max_batch``: every prompt admitted at that frame (new requests and the next
pieces of running ones) is prefilled in one backbone pass. After the frame it decodes the new frames of
every sequence that has a chunk ready (the codec's row decoder: only those rows) and hands each job its
audio: its first frame at once (the time to the first byte), then every ``chunk`` frames. Active rows
stay packed at the front of the cache (a retired row takes the last one's place), so a step computes
only the active rows.

A job is one request: its text pieces (sentences) run one after the other in the same row, each
prompted by the voice and the previous piece (``Synthesizer.prompt``, the engine's prompts), with
the engine's pause between them. Each job samples from its own ``torch.Generator`` seeded with its
seed, so with fp32 matmuls its codes do not depend on which other jobs share its steps. With a
quantized plan (``quantize=auto|int8|int4``) they can: the kernel is chosen per call by its row count
(``quant.RowDispatch``; int8 also quantizes activations above 16 rows), so a request alone and the same
request among 8 others may run different kernels and differ in a few near-tie codes (within the
agreement check's 1 %, which probes batch 1).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from elise.codec.base import RowDecoder
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
    codes: list[Tensor] = field(default_factory=list)  # this piece's speech frames [32] each
    pending: list[Tensor] = field(default_factory=list)  # frames not decoded yet
    codec_row: int = -1  # its stream of the codec's row decoder
    timed_out: bool = False
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled.set()


class Batcher:
    """The model worker. ``submit`` queues a job; ``start``/``stop`` run the worker thread.

    ``chunk_frames``: frames decoded and handed out together; a job's first ``first_chunk_frames``
    (default 1) go out as soon as they exist, so its first byte waits for one frame, not a chunk.
    ``admit_window_s``: how long an idle worker woken by a request waits for others arriving with it.
    """

    def __init__(self, synth: Synthesizer, max_batch: int = 16, max_queue: int = 64,
                 max_positions: int = 2048, chunk_frames: int = 4,
                 on_step: Callable[[int], None] | None = None, first_chunk_frames: int = 1,
                 admit_window_s: float = 0.0, on_time: Callable[[dict[str, float]], None] | None = None):  # fmt: skip
        self.synth, self.model, self.codec = synth, synth.model, synth.codec
        self.max_batch, self.max_queue, self.chunk = int(max_batch), int(max_queue), max(1, int(chunk_frames))
        self.first_chunk = max(1, min(int(first_chunk_frames), self.chunk))
        self.admit_window = max(0.0, float(admit_window_s))
        self.max_len = min(int(max_positions), self.model.cfg.backbone.max_seq_len)
        self.on_step = on_step
        self.on_time = on_time  # seconds of each frame boundary by phase (prefill, frame, decode)
        self.gen = FrameGenerator(self.model, self.max_batch, self.max_len, SamplingConfig())
        self.device = self.gen.device
        # per active row (row i = rows[i]), on the model's device: the piece's frames so far, its EOS
        # floor and its frame limit
        self.frame = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        self.floor = torch.zeros_like(self.frame)
        self.limit = torch.zeros_like(self.frame)
        self.groups: list[tuple[SamplingConfig, Tensor, list[torch.Generator]]] | None = None  # by sampling
        self.rows: list[Job] = []  # active jobs, row i of the cache = rows[i]
        self.between: list[Job] = []  # jobs whose piece ended: next piece or done at the next frame
        self.waiting: collections.deque[Job] = collections.deque()
        self.calls: collections.deque[tuple[Callable[[], object], Future]] = collections.deque()
        self.cond = threading.Condition()
        self.codec_rows = [True] * self.max_batch  # free streams of the codec's row decoder
        self.pause = torch.zeros(round(synth.settings.pause_ms / 1000 * synth.sample_rate))
        self.thread: threading.Thread | None = None
        self.running = False
        self.steps = 0
        self.prefills: list[int] = []  # prompts per prefill pass (the last few hundred; tests, metrics)

    # ---- the request side ------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return len(self.waiting)

    def active(self) -> int:
        """Requests holding a row: generating, or between two of their pieces."""
        return self.codec_rows.count(False)

    def submit(self, job: Job) -> Job:
        """Queue ``job``; QueueFull when ``max_queue`` jobs already wait. A worker that has stopped (or
        failed) fails the job at once instead of leaving it waiting for ever."""
        with self.cond:
            stopped = self.thread is not None and not self.running
            if not stopped:
                if len(self.waiting) >= self.max_queue:
                    raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
                self.waiting.append(job)
                self.cond.notify()
        if stopped:
            job.sink(RuntimeError("the model worker is not running"))
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

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker: it fails the jobs and calls it still holds on its way out (never this thread
        while it may still run: a worker busy in a step past ``timeout`` cleans up when it gets there)."""
        with self.cond:
            self.running = False
            self.cond.notify()
        if self.thread is None:
            self._fail_all(RuntimeError("the server is shutting down"))
            return
        self.thread.join(timeout=timeout)
        if self.thread.is_alive():
            log.warning("the model worker is still in a step after %.0f s; it stops after it", timeout)
        else:  # the worker has gone: whatever reached the queues after its own clean-up fails here
            self._fail_all(RuntimeError("the server is shutting down"))

    def _fail_all(self, err: BaseException) -> None:
        with self.cond:
            jobs, self.rows, self.between = [*self.rows, *self.between, *self.waiting], [], []
            self.waiting.clear()
            calls, self.calls = list(self.calls), collections.deque()
        for job in jobs:
            job.sink(err)
        for _fn, future in calls:
            future.set_exception(err)

    # ---- the worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        error: BaseException = RuntimeError("the server is shutting down")
        try:
            with torch.inference_mode(), self.codec.row_decoder(self.max_batch) as decoder:
                while True:
                    with self.cond:
                        while self.running and not (self.rows or self.between or self.waiting or self.calls):
                            self.cond.wait()
                        if not self.running:
                            return
                        self._gather()
                        if not self.running:  # stopped during the admit window
                            return
                    self._run_calls()
                    self._frame(decoder)
        except BaseException as err:  # a broken worker fails every job, never hangs them
            log.exception("model worker failed")
            error = err
        finally:
            self.running = False
            self._fail_all(error)

    def _gather(self) -> None:
        """An idle worker woken by a request waits ``admit_window`` for the requests arriving with it
        (clients rarely arrive in the same millisecond), so they share one prefill and one first frame
        instead of the later ones waiting for the first one's. Called holding ``cond``."""
        if self.rows or self.between or not self.waiting or self.admit_window <= 0:
            return
        end = time.perf_counter() + self.admit_window
        while self.running and len(self.waiting) < self.max_batch and (left := end - time.perf_counter()) > 0:
            self.cond.wait(left)

    def _frame(self, decoder: RowDecoder) -> None:
        """One frame boundary: retire, hand out what ended, admit (one prefill), step, decode."""
        now = time.perf_counter()
        for i in reversed(range(len(self.rows))):
            job = self.rows[i]
            if job.cancelled.is_set() or now > job.deadline:
                job.timed_out = not job.cancelled.is_set()
                self._retire(i)
                self.between.append(job)
        self._decode(decoder, self.between)  # the rest of the pieces that ended
        admit: list[Job] = []
        between, self.between = self.between, []
        for job in between:
            if job.cancelled.is_set():
                self._free(job)
            elif job.timed_out or (job.piece + 1 < len(job.pieces) and now > job.deadline):
                self._free(job)
                job.sink(TimeLimit("the request ran past the server's time limit"))
            elif job.piece + 1 < len(job.pieces):
                self._emit(job, self.pause)
                admit.append(job)
            else:
                self._free(job)
                job.sink(DONE)
        while len(self.rows) + len(admit) < self.max_batch:
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
            admit.append(job)
        t0 = time.perf_counter()
        if admit:
            try:
                self._admit(admit, decoder)
            except BaseException as err:  # the worker dies; the jobs it held only here must hear it
                for job in admit:
                    if job not in self.rows:
                        job.sink(err)
                raise
        t1 = time.perf_counter()
        if self.rows:
            self._step()
        t2 = time.perf_counter()
        ready = [
            j for j in self.rows if len(j.pending) >= (self.first_chunk if j.samples == 0 else self.chunk)
        ]
        self._decode(decoder, ready + self.between)
        if self.on_time is not None:
            self.on_time({"prefill": t1 - t0, "frame": t2 - t1, "decode": time.perf_counter() - t2})

    def _free(self, job: Job) -> None:
        if job.codec_row >= 0:
            self.codec_rows[job.codec_row] = True
            job.codec_row = -1

    def _admit(self, jobs: list[Job], decoder: RowDecoder) -> None:
        """Prefill the next piece of every job in ``jobs`` into the next free rows, in one backbone pass
        (a failing prompt fails only its job)."""
        prompts: list[tuple[Tensor, Tensor]] = []
        admitted: list[Job] = []
        for job in jobs:
            job.piece += 1
            try:
                (tokens, mask), limit, floor = self.synth.prompt(
                    job.pieces[job.piece], job.speaker, job.previous, None, job.context
                )
                if tokens.shape[0] >= self.max_len:
                    raise SynthesisError(
                        f"the prompt takes {tokens.shape[0]} of the server's {self.max_len} positions"
                    )
            except SynthesisError as err:
                self._free(job)
                job.sink(err)
                continue
            r = len(self.rows) + len(admitted)
            self.limit[r], self.floor[r], self.frame[r] = min(limit, self.max_len - tokens.shape[0]), floor, 0
            job.codes = []
            prompts.append((tokens, mask))
            admitted.append(job)
            decoder.reset(job.codec_row)  # a fresh decoder stream per piece, as the engine's
        if not admitted:
            return
        self.gen.prefill_rows(len(self.rows), prompts)
        self.prefills = [*self.prefills[-255:], len(prompts)]
        self.rows += admitted
        self.groups = None

    def _retire(self, i: int) -> None:
        """Free row ``i``: the last active row moves into it."""
        last = len(self.rows) - 1
        if i != last:
            self.gen.move_row(last, i)
            for t in (self.frame, self.floor, self.limit):
                t[i] = t[last]
            self.rows[i] = self.rows[last]
        self.rows.pop()
        self.groups = None

    def _sampling_groups(self) -> list[tuple[SamplingConfig, Tensor, list[torch.Generator]]]:
        """The active rows by sampling settings: (settings, row indices, their generators); kept until
        a row joins or leaves."""
        if self.groups is None:
            by: dict[tuple, list[int]] = {}
            for i, job in enumerate(self.rows):
                s = job.sampling
                by.setdefault((s.temperature, s.top_k, s.depth_temperature), []).append(i)
            self.groups = [
                (self.rows[idx[0]].sampling, torch.tensor(idx, device=self.device),
                 [self.rows[i].generator for i in idx])  # type: ignore[misc]
                for idx in by.values()
            ]  # fmt: skip
        return self.groups

    def _step(self) -> None:
        """One frame for every active row: codebook 0 + depth decoder, then the backbone step."""
        n = len(self.rows)
        h = self.gen.hidden[:n]  # [n, Db]
        allow = self.frame[:n] >= self.floor[:n]  # [n] rows that may end at this frame
        groups = self._sampling_groups()
        if len(groups) == 1:
            sampling, _idx, gens = groups[0]
            codes = self.gen.decode_frame(h, allow, sampling, gens)  # [n, 32]
        else:
            codes = torch.empty(n, NUM_CODEBOOKS, dtype=torch.long, device=self.device)
            for sampling, idx, gens in groups:
                codes[idx] = self.gen.decode_frame(h[idx], allow[idx], sampling, gens)
        self.frame[:n] += 1
        cpu = codes.cpu()  # one transfer of the frame; the flags below are read from it as lists
        eos = (cpu == EOS_CODE).all(-1).tolist()  # [n]
        hit = (self.frame[:n] >= self.limit[:n]).tolist()
        ended = [i for i in range(n) if eos[i] or hit[i]]
        for i, job in enumerate(self.rows):
            if not eos[i]:
                job.codes.append(cpu[i])
                job.pending.append(cpu[i])
        self.steps += 1
        if self.on_step is not None:
            self.on_step(n)
        self.gen.advance_rows(codes)  # every row (an ended row's step is wasted, but the rows stay in order)
        for i in reversed(ended):
            job = self.rows[i]
            done = eos[i]
            if not done:
                log.warning("a piece reached its frame limit (%d frames) without end-of-speech; cut there",
                            int(self.limit[i]))  # fmt: skip
            piece = (
                torch.stack(job.codes, dim=1)
                if job.codes
                else torch.zeros(NUM_CODEBOOKS, 0, dtype=torch.long)
            )
            job.spoken.append((piece, done))
            keep = self.synth.settings.carry_context and done and job.codes
            job.previous = Segment(job.pieces[job.piece], job.speaker, piece) if keep else None
            self._retire(i)
            self.between.append(job)

    def _decode(self, decoder: RowDecoder, jobs: list[Job]) -> None:
        """Decode the pending frames of ``jobs`` (only their codec rows) and hand the audio out."""
        jobs = [j for j in jobs if j.pending]
        if not jobs:
            return
        wav = decoder.decode({j.codec_row: torch.stack(j.pending, dim=1) for j in jobs})  # row -> [t * spf]
        for j in jobs:
            j.pending = []
            self._emit(j, wav[j.codec_row].float().cpu())

    def _emit(self, job: Job, audio: Tensor) -> None:
        if job.cancelled.is_set():
            return
        if job.first_audio is None:
            job.first_audio = time.perf_counter() - job.submitted
        job.samples += audio.numel()
        job.sink(audio)
