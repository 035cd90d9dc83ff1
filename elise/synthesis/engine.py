"""Batched, optionally streamed synthesis of utterances split into pieces (sentences).

Every utterance of a batch advances one piece per round: round r generates piece r of every
utterance that has one, from left-padded prompts (voice-prompt context, the utterance's previous
piece when ``carry_context``, then the piece's text rows). Each piece stops at its EOS frame or at
its text-scaled frame limit; pieces are decoded separately and joined with a short pause. With
``stream``, frames are decoded by the codec's stateful streaming decoder every
``stream_chunk_frames`` frames and appended to the wav (valid after every chunk); a fresh decoder
per piece makes the streamed audio equal the non-streamed audio.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from elise.codec.base import Codec
from elise.generate import SamplingConfig, generate, left_pad
from elise.layout import EOS_CODE, NUM_CODEBOOKS
from elise.model.csm import CSM
from elise.synthesis.errors import SynthesisError
from elise.synthesis.prompt import Segment, build_prompt
from elise.synthesis.text import LengthBound, max_frames, split_sentences
from elise.synthesis.wav import WavWriter
from elise.text import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """Generation options (the ``synthesize.yaml`` keys of the same names)."""

    speaker: int | str = 0
    temperature: float = 0.9
    top_k: int = 50
    seed: int = 0
    max_audio_seconds: float | None = None
    bound: LengthBound = field(default_factory=LengthBound)
    split_sentences: bool = True
    max_sentence_chars: int = 180
    min_sentence_chars: int = 12
    pause_ms: float = 150.0
    carry_context: bool = True
    stream: bool = False
    stream_chunk_frames: int = 4


@dataclass
class Job:
    """One utterance: its number, text, output wav and the pieces it is generated in."""

    index: int
    text: str
    path: Path
    pieces: list[str]


@dataclass
class Result:
    job: Job
    codes: list[Tensor]  # per piece [32, frames]
    eos: list[bool]  # per piece: ended with the EOS frame (False: cut at its frame limit)
    num_samples: int
    generation_seconds: float
    first_chunk_seconds: float | None
    batch_size: int

    @property
    def frames(self) -> int:
        return sum(int(c.shape[1]) for c in self.codes)

    def all_codes(self) -> Tensor:
        """[32, frames] of all pieces, in order (pauses are not codes)."""
        return torch.cat(self.codes, dim=1) if self.codes else torch.zeros(NUM_CODEBOOKS, 0, dtype=torch.long)


class StreamSink:
    """``on_frame`` callback: buffers frames, decodes them every ``chunk`` frames, appends to the writers.

    Items of a batch advance in lockstep; frames after an item's end (its EOS frame, or filler while
    others finish) are decoded with the batch but not written.
    """

    def __init__(
        self, step: Callable[[Tensor], Tensor], writers: list[WavWriter], chunk: int, spf: int, on_write
    ):
        self.step, self.writers, self.on_write = step, writers, on_write
        self.chunk, self.spf = max(1, chunk), spf
        self.done = torch.zeros(len(writers), dtype=torch.bool)
        self.frames: list[Tensor] = []
        self.valid: list[Tensor] = []

    def __call__(self, codes: Tensor, finished: Tensor) -> None:
        codes, finished = codes.cpu(), finished.cpu()  # [B, 32], [B]
        eos = (codes == EOS_CODE).all(-1)  # [B]
        self.valid.append(~self.done & ~eos)
        self.frames.append(codes)
        self.done |= finished
        if len(self.frames) >= self.chunk or bool(self.done.all()):
            self.flush()

    def flush(self) -> None:
        if not self.frames:
            return
        codes = torch.stack(self.frames, dim=2)  # [B, 32, t]
        valid = torch.stack(self.valid, dim=1)  # [B, t], a prefix of each row
        self.frames, self.valid = [], []
        wav = self.step(codes)  # [B, 1, t * spf]
        for b, writer in enumerate(self.writers):
            n = int(valid[b].sum())
            if n:
                writer.append(wav[b, 0, : n * self.spf].float().cpu().numpy())
                self.on_write(b)


class Synthesizer:
    """Text -> wav files with one model, tokenizer, codec, voice prompt and ``Settings``."""

    def __init__(
        self, model: CSM, tokenizer: Tokenizer, codec: Codec, settings: Settings, context: list[Segment]
    ):
        self.model, self.tokenizer, self.codec = model, tokenizer, codec
        self.s, self.context = settings, context
        self.device = next(model.parameters()).device
        self.max_len = model.cfg.backbone.max_seq_len
        self.sampling = SamplingConfig(temperature=settings.temperature, top_k=settings.top_k)
        self.pause = np.zeros(round(settings.pause_ms / 1000 * codec.sample_rate), dtype=np.float32)

    def job(self, index: int, text: str, path: Path) -> Job:
        s = self.s
        pieces = (
            split_sentences(text, s.max_sentence_chars, s.min_sentence_chars) if s.split_sentences else [text]
        )
        if not pieces:
            raise SynthesisError(f"utterance {index} is empty")
        return Job(index, text, path, pieces)

    def prompt(self, piece: str, previous: Segment | None) -> tuple[tuple[Tensor, Tensor], int]:
        """Prompt rows and frame limit of one piece; the previous piece is dropped if it leaves no room."""
        limit = max_frames(piece, self.s.max_audio_seconds, self.s.bound)
        context = self.context + ([previous] if previous is not None else [])
        rows = build_prompt(self.tokenizer, piece, self.s.speaker, context)
        if previous is not None and rows[0].shape[0] + limit > self.max_len:
            rows = build_prompt(self.tokenizer, piece, self.s.speaker, self.context)
        if rows[0].shape[0] >= self.max_len:
            raise SynthesisError(
                f"the prompt takes {rows[0].shape[0]} of the model's {self.max_len} positions: "
                "use a shorter reference_audio or text"
            )
        return rows, limit

    def _decode(self, codes: Tensor) -> np.ndarray:
        if codes.shape[1] == 0:
            return np.zeros(0, dtype=np.float32)
        wav = self.codec.decode(codes[None])  # [1, 1, frames * spf]
        return wav[0, 0].float().cpu().numpy()

    def run_batch(self, jobs: list[Job]) -> list[Result]:
        """Generate every job of a batch; writes their wavs and returns one Result each."""
        s, spf = self.s, self.codec.samples_per_frame
        t0 = time.perf_counter()
        gen = torch.Generator(device=self.device).manual_seed(int(s.seed) + jobs[0].index)
        first: list[float | None] = [None] * len(jobs)
        writers = [WavWriter(j.path, self.codec.sample_rate) for j in jobs] if s.stream else []
        audio: list[list[np.ndarray]] = [[] for _ in jobs]
        codes_out: list[list[Tensor]] = [[] for _ in jobs]
        eos_out: list[list[bool]] = [[] for _ in jobs]
        previous: list[Segment | None] = [None] * len(jobs)
        try:
            for r in range(max(len(j.pieces) for j in jobs)):
                active = [b for b, j in enumerate(jobs) if r < len(j.pieces)]
                built = [self.prompt(jobs[b].pieces[r], previous[b]) for b in active]
                tokens, mask, pads = left_pad([rows for rows, _ in built])  # [A, S, 33] x2, [A]
                room = self.max_len - tokens.shape[1]  # the batch's KV cache holds S + frames positions
                limits = torch.tensor([min(limit, room) for _, limit in built])  # [A]
                if s.stream:
                    if r > 0:
                        for b in active:
                            writers[b].append(self.pause)

                    def mark(a: int, active=active) -> None:
                        if first[active[a]] is None:
                            first[active[a]] = time.perf_counter() - t0

                    with self.codec.streaming_decoder(len(active)) as step:
                        sink = StreamSink(
                            step, [writers[b] for b in active], s.stream_chunk_frames, spf, mark
                        )
                        codes, lengths = generate(
                            self.model, tokens, mask, limits, self.sampling, gen, pads, on_frame=sink
                        )
                        sink.flush()
                else:
                    codes, lengths = generate(self.model, tokens, mask, limits, self.sampling, gen, pads)
                for a, b in enumerate(active):
                    n, job = int(lengths[a]), jobs[b]
                    piece_codes = codes[a, :, :n]  # [32, n]
                    ended = n < int(limits[a])  # an EOS frame came before the limit
                    if not ended:
                        log.warning(
                            "utterance %d piece %d: no end-of-speech within %d frames (%.1f s); cut there",
                            job.index, r + 1, n, n / self.codec.frame_rate,
                        )  # fmt: skip
                    elif n == 0:
                        log.warning(
                            "utterance %d piece %d: the model ended speech at once (no audio)",
                            job.index,
                            r + 1,
                        )
                    codes_out[b].append(piece_codes)
                    eos_out[b].append(ended)
                    if not s.stream:
                        if r > 0:
                            audio[b].append(self.pause)
                        audio[b].append(self._decode(piece_codes))
                    keep = s.carry_context and ended and n > 0
                    previous[b] = Segment(job.pieces[r], s.speaker, piece_codes) if keep else None
            if not s.stream:
                writers = [WavWriter(j.path, self.codec.sample_rate) for j in jobs]
                for w, pieces in zip(writers, audio, strict=True):
                    w.append(np.concatenate(pieces) if pieces else np.zeros(0, np.float32))
        finally:
            for w in writers:
                w.close()
        seconds = time.perf_counter() - t0
        samples = [w.num_samples for w in writers]
        return [
            Result(job, codes_out[b], eos_out[b], samples[b], seconds, first[b], len(jobs))
            for b, job in enumerate(jobs)
        ]
