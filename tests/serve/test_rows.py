"""The model worker's rows, without HTTP: prompts admitted together share one prefill and give each
its solo state, requests join at the next frame, a request's first audio leaves after one frame,
only rows with new frames are decoded, and stop() leaves the cleaning to the worker."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from elise.codec.base import RowDecoder
from elise.generate import FrameGenerator, SamplingConfig
from elise.serve.batcher import DONE, Batcher, Job
from elise.synthesis import Synthesizer

TEXTS = ["Hello there.", "A second voice, with commas.", "Short.", "Numbers like 42 and 7."]


@pytest.fixture(scope="module")
def synth(tiny_ckpt) -> Synthesizer:
    s = Synthesizer.load(str(tiny_ckpt), "tiny")
    s.settings = replace(s.settings, max_audio_seconds=0.8)  # random heads never say EOS: 10 frames
    return s


def prompt(synth: Synthesizer, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    return synth.prompt(text, 0, None)[0]


@torch.inference_mode()
def test_prompts_prefilled_together_give_each_its_solo_state(synth):
    prompts = [prompt(synth, t) for t in TEXTS]
    assert len({p[0].shape[0] for p in prompts}) > 1  # different lengths: right padding is exercised
    together = FrameGenerator(synth.model, 8, 64, SamplingConfig())
    together.prefill_rows(2, prompts)  # rows 2..5, next to empty rows
    for i, p in enumerate(prompts):
        solo = FrameGenerator(synth.model, 1, 64, SamplingConfig())
        solo.prefill_rows(0, [p])
        n = p[0].shape[0]
        assert int(together.lengths[2 + i]) == n
        torch.testing.assert_close(together.hidden[2 + i], solo.hidden[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            together.backbone_cache.k[:, 2 + i, :, :n],
            solo.backbone_cache.k[:, 0, :, :n],
            rtol=1e-5,
            atol=1e-5,
        )
    # and the rows go on alike: one frame each, at their own positions
    codes = torch.randint(0, 2048, (6, 32))
    together.advance_rows(codes)
    for i, p in enumerate(prompts):
        solo = FrameGenerator(synth.model, 1, 64, SamplingConfig())
        solo.prefill_rows(0, [p])
        solo.advance_rows(codes[2 + i : 3 + i])
        torch.testing.assert_close(together.hidden[2 + i], solo.hidden[0], rtol=1e-5, atol=1e-5)


class Rows(RowDecoder):
    """A stateless row decoder that records the rows of every call."""

    def __init__(self, decode):
        super().__init__(decode)
        self.calls: list[list[int]] = []

    def decode(self, chunks):
        self.calls.append(sorted(chunks))
        return super().decode(chunks)


def run_jobs(
    synth: Synthesizer, texts: list[str], *, chunk: int = 4, during=None, max_batch: int = 8, seed: int = 100
):
    """Run ``texts`` as jobs on a worker (all submitted before it starts, so they are admitted at the same
    frame; job i samples with ``seed + i``); ``during(batcher, jobs, job)`` is called after each step. Returns (audio per job, batch size per
    step, step count at each job's first audio, the decoder's calls, the batcher)."""
    sizes: list[int] = []
    decoder = Rows(synth.codec.decode)
    batcher = Batcher(synth, max_batch=max_batch, chunk_frames=chunk, on_step=lambda n: on_step(n))
    first: dict[int, int] = {}
    audio: dict[int, list[torch.Tensor]] = {}
    done = threading.Semaphore(0)
    jobs = []

    def job(i: int, text: str) -> Job:
        def sink(item: object) -> None:
            if isinstance(item, torch.Tensor):
                first.setdefault(i, batcher.steps)
                audio.setdefault(i, []).append(item)
            else:
                assert item is DONE, item
                done.release()

        return Job([text], 0, [], SamplingConfig(), seed + i, sink, float("inf"))

    def on_step(n: int) -> None:
        sizes.append(n)
        if during is not None:
            during(batcher, jobs, job)

    synth.codec.row_decoder = lambda rows: _context(decoder)  # type: ignore[method-assign]
    try:
        for i, text in enumerate(texts):
            jobs.append(batcher.submit(job(i, text)))
        batcher.start()
        for _ in range(len(texts) + (during is not None)):
            assert done.acquire(timeout=120)
    finally:
        batcher.stop()
        del synth.codec.row_decoder
    wavs = [torch.cat(audio[i]) for i in sorted(audio)]
    return wavs, sizes, first, decoder.calls, batcher


class _context:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def test_requests_admitted_together_share_one_prefill_and_keep_their_solo_audio(synth):
    solo = [run_jobs(synth, [t], seed=100 + i)[0][0] for i, t in enumerate(TEXTS)]
    together, sizes, _first, _calls, batcher = run_jobs(synth, TEXTS)
    assert batcher.prefills[0] == len(TEXTS)  # one backbone pass for the four prompts
    assert max(sizes) == len(TEXTS)
    for a, b in zip(solo, together, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_request_joins_at_the_next_frame_and_hears_its_first_frame_at_once(synth):
    def during(batcher, jobs, job):
        if batcher.steps == 1 and len(jobs) == 1:  # after the first frame of the first job
            jobs.append(batcher.submit(job(1, TEXTS[1])))

    _wavs, sizes, first, calls, _b = run_jobs(synth, [TEXTS[0]], chunk=4, during=during)
    assert sizes[:3] == [1, 2, 2]  # joined before the second frame, not at the 4-frame chunk boundary
    assert first == {0: 1, 1: 2}  # each job's first audio right after its first frame
    assert [0] in calls and all(len(c) <= 2 for c in calls)


def test_only_rows_with_new_frames_are_decoded(synth):
    _wavs, _sizes, _first, calls, _b = run_jobs(synth, [TEXTS[2]], chunk=2, max_batch=8)
    assert calls and all(c == calls[0] and len(c) == 1 for c in calls)  # one row of the 8, each call

    # a second job joining one frame later is out of phase with the first (first frame at once, then
    # every 2 frames): the calls where only one of them has a chunk ready decode that row alone
    def during(batcher, jobs, job):
        if batcher.steps == 1 and len(jobs) == 1:
            jobs.append(batcher.submit(job(1, TEXTS[3])))

    _wavs, _sizes, _first, calls, _b = run_jobs(synth, [TEXTS[2]], chunk=2, max_batch=8, during=during)
    rows = {r for c in calls for r in c}
    assert len(rows) == 2 and any(len(c) == 1 for c in calls[1:]) and any(len(c) == 2 for c in calls)


def test_stop_lets_the_worker_fail_its_jobs_itself(synth):
    """A worker still inside a step when stop() gives up waiting: the jobs are failed by the worker when
    it leaves the step, never by the stopping thread under its feet."""
    release, entered = threading.Event(), threading.Event()
    failed_on: list[str] = []

    class Stuck(Batcher):
        def _step(self) -> None:
            entered.set()
            release.wait(30)

    batcher = Stuck(synth, max_batch=2)
    batcher.start()
    job = Job(["Hello."], 0, [], SamplingConfig(), 1, lambda _item: failed_on.append(threading.current_thread().name),
              float("inf"))  # fmt: skip
    batcher.submit(job)
    assert entered.wait(30)
    batcher.stop(timeout=0.2)  # the worker is stuck in its step
    assert failed_on == [] and batcher.rows == [job]  # nothing cleaned under the worker
    release.set()
    batcher.thread.join(30)
    assert failed_on == ["elise-batcher"]


def test_an_idle_worker_gathers_the_requests_arriving_with_the_first(synth):
    """Clients rarely arrive in the same millisecond: the worker woken by the first request waits (up to
    ``admit_window_s``, or until ``max_batch`` wait) so they share the first prefill."""
    done = threading.Semaphore(0)
    batcher = Batcher(synth, max_batch=2, admit_window_s=60.0)  # ends when 2 wait, never by the clock here
    batcher.start()
    try:
        for i in range(2):
            batcher.submit(Job([TEXTS[i]], 0, [], SamplingConfig(), i, lambda item: item is DONE and done.release(),
                               float("inf")))  # fmt: skip
        assert done.acquire(timeout=120) and done.acquire(timeout=120)
        assert batcher.prefills[0] == 2
    finally:
        batcher.stop()


def test_warm_up_returns_with_the_worker_idle(synth):
    """Ready means idle: the warm-up request is retired before the first client's request, which would
    otherwise wait for the warm-up's remaining frames."""
    from elise.serve.app import Limits, Server
    from elise.serve.metrics import Metrics

    batcher = Batcher(synth, max_batch=2)
    batcher.start()
    try:
        server = Server(synth, batcher, None, Metrics(), Limits())  # type: ignore[arg-type]
        server.warm_up()
        assert server.ready and batcher.active() == 0 and batcher.rows == [] and batcher.between == []
    finally:
        batcher.stop()


def test_a_worker_that_fails_while_admitting_fails_its_jobs_and_later_ones(synth, monkeypatch):
    """A failure in the batched prefill (out of memory, a bad prompt) kills the worker: the jobs it was
    admitting, a job submitted afterwards and the shutdown all answer instead of hanging."""
    got: dict[int, list[object]] = {0: [], 1: []}
    batcher = Batcher(synth, max_batch=4, chunk_frames=2)

    def boom(*args, **kwargs):
        raise RuntimeError("prefill failed")

    monkeypatch.setattr(batcher.gen, "prefill_rows", boom)
    batcher.submit(Job([TEXTS[0]], 0, [], SamplingConfig(), 1, got[0].append, float("inf")))
    batcher.start()
    batcher.thread.join(timeout=60)
    assert not batcher.thread.is_alive() and not batcher.running
    assert [str(e) for e in got[0]] == ["prefill failed"]
    batcher.submit(Job([TEXTS[1]], 0, [], SamplingConfig(), 2, got[1].append, float("inf")))
    assert [str(e) for e in got[1]] == ["the model worker is not running"]
    batcher.stop(timeout=1)
    assert len(got[0]) == len(got[1]) == 1  # each job heard one failure, once


def test_every_piece_starts_a_fresh_codec_stream_even_in_a_reused_row(synth):
    """A job of two pieces, then a second job in the row the first one freed (max_batch=1): the codec
    row is reset before the first decode of each piece, so no piece hears the previous one's state."""

    class Recorder(Rows):
        def __init__(self, decode):
            super().__init__(decode)
            self.events: list[tuple[str, int]] = []

        def reset(self, row):
            self.events.append(("reset", row))

        def decode(self, chunks):
            self.events += [("decode", row) for row in sorted(chunks)]
            return super().decode(chunks)

    decoder = Recorder(synth.codec.decode)
    done = threading.Semaphore(0)
    sink = lambda item: done.release() if item is DONE else None  # noqa: E731
    batcher = Batcher(synth, max_batch=1, chunk_frames=4)
    synth.codec.row_decoder = lambda rows: _context(decoder)  # type: ignore[method-assign]
    try:
        batcher.submit(Job(["First piece.", "Second piece."], 0, [], SamplingConfig(), 1, sink, float("inf")))
        batcher.submit(Job(["Another job."], 0, [], SamplingConfig(), 2, sink, float("inf")))
        batcher.start()
        assert done.acquire(timeout=120) and done.acquire(timeout=120)
    finally:
        batcher.stop()
        del synth.codec.row_decoder
    resets = [i for i, e in enumerate(decoder.events) if e[0] == "reset"]
    assert len(resets) == 3 and {row for _, row in decoder.events} == {0}  # 3 pieces, one reused row
    assert resets[0] == 0  # before the first decode
    for a, b in zip(resets, [*resets[1:], len(decoder.events)], strict=True):
        assert b - a > 1  # each piece decodes after its reset
