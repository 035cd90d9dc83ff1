"""The synthesis engine: requests in, audio out. It owns the settings, the prompts (voice reference,
previous piece) and the decoding, and never writes files (``elise.synthesize`` and the training
samples callback do, through ``elise.data.audio``).

Every request of a batch advances one piece (sentence) per round: round r generates piece r of every
request that has one, from left-padded prompts (voice-prompt context, the request's previous piece
when ``carry_context``, then the piece's text rows). A piece stops at its EOS frame (never before
``length.min_seconds_per_char`` per character) or at its text-scaled frame limit; pieces are decoded
separately and joined with a short pause. Each request samples from its own generator seeded
``seed + position``, so a request's audio does not depend on ``batch_size``. With ``on_chunk``
(or ``stream``) frames are decoded by the codec's streaming decoder every ``stream_chunk_frames``
frames; a fresh decoder per piece makes the streamed audio equal the non-streamed audio.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from elise.codec.base import Codec
from elise.generate import SamplingConfig, generate, left_pad
from elise.layout import EOS_CODE, NUM_CODEBOOKS, text_rows
from elise.model.csm import CSM
from elise.synthesis.errors import SynthesisError
from elise.synthesis.prompt import Segment, build_prompt, load_references
from elise.synthesis.text import FRAME_RATE, LengthBound, max_frames, split_sentences
from elise.text import Tokenizer

if TYPE_CHECKING:
    from elise.checkpoints import Loaded

log = logging.getLogger(__name__)

OnChunk = Callable[[int, Tensor], None]  # (request position in the call, audio chunk [n] float32)


@dataclass
class Settings:
    """Generation options (the ``synthesize.yaml`` keys of the same names)."""

    speaker: int | str = 0
    temperature: float = 0.9
    top_k: int = 50
    depth_temperature: float | None = None
    seed: int = 0
    max_audio_seconds: float | None = None
    bound: LengthBound = field(default_factory=LengthBound)
    split_sentences: bool = True
    max_sentence_chars: int = 180
    min_sentence_chars: int = 12
    pause_ms: float = 150.0
    carry_context: bool = True
    batch_size: int = 1
    stream_chunk_frames: int = 4


@dataclass
class Request:
    """One utterance. ``seed`` None: the settings' seed + its 1-based position in the call.
    ``prompt_ids``: already tokenized ``[speaker]text`` ids (one piece; training examples).
    ``context``: the segments before its text (a conversation's voices and turns) in place of the
    Synthesizer's voice prompt (None: the voice prompt)."""

    text: str
    speaker: int | str | None = None
    seed: int | None = None
    prompt_ids: list[int] | None = None
    context: list[Segment] | None = None


@dataclass
class Result:
    """The audio of one request and how it was made."""

    audio: Tensor  # [N] float32 (pieces joined with pauses)
    sample_rate: int
    pieces: list[Tensor]  # per piece codes [32, frames]
    eos: list[bool]  # per piece: ended with the EOS frame (False: cut at its frame limit)
    metrics: dict[str, Any]

    @property
    def codes(self) -> Tensor:
        """[32, frames] of all pieces, in order (pauses are not codes)."""
        if not self.pieces:
            return torch.zeros(NUM_CODEBOOKS, 0, dtype=torch.long)
        return torch.cat(self.pieces, dim=1)


class StreamSink:
    """``on_frame`` callback: buffers frames, decodes them every ``chunk`` frames, hands out the audio.

    Items of a batch advance in lockstep; frames after an item's end (its EOS frame, or filler while
    others finish) are decoded with the batch but not handed out.
    """

    def __init__(self, step: Callable[[Tensor], Tensor], emit: Callable[[int, Tensor], None], n: int,
                 chunk: int, spf: int):  # fmt: skip
        self.step, self.emit, self.chunk, self.spf = step, emit, max(1, chunk), spf
        self.done = torch.zeros(n, dtype=torch.bool)
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
        for b in range(wav.shape[0]):
            n = int(valid[b].sum())
            if n:
                self.emit(b, wav[b, 0, : n * self.spf].float().cpu())


class Synthesizer:
    """Text -> audio with one model, tokenizer, codec, voice prompt and ``Settings``."""

    def __init__(self, model: CSM, tokenizer: Tokenizer | None, codec: Codec, settings: Settings | None = None,
                 speakers: dict[str, int] | None = None, context: list[Segment] | None = None):  # fmt: skip
        self.model, self.tokenizer, self.codec = model, tokenizer, codec
        self.settings = settings or Settings()
        self.speakers = dict(speakers or {})
        self.context = list(context or [])
        self.device = next(model.parameters()).device
        self.max_len = model.cfg.backbone.max_seq_len

    @classmethod
    def load(cls, ckpt: str | Loaded, codec: dict[str, Any] | str | None = None, device: str = "cpu",
             dtype: str = "auto", quantize: str | None = None, compile: bool = False,
             settings: Settings | None = None, base: str | None = None) -> Synthesizer:  # fmt: skip
        """Load a checkpoint (elise .ckpt or transformers directory) and its codec (None: the recorded one);
        a LoRA checkpoint merged into ``base`` (None: the base path it records). ``ckpt`` may be a model in
        memory (``elise.checkpoints.Loaded``): it is used as it is (cast and fused in place)."""
        from elise.checkpoints import Loaded
        from elise.synthesis.runtime import load, load_codec, prepare_model, resolve_device, resolve_dtype

        dev = resolve_device(device)
        if isinstance(ckpt, Loaded):
            loaded = ckpt
            loaded.model.to(dev)
        else:
            loaded = load(ckpt, dev, base)
        model = prepare_model(loaded.model, resolve_dtype(dtype, dev), quantize, compile)
        codec_model = load_codec(codec, loaded.codec, dev, model.cfg.num_codebooks)
        return cls(model, loaded.tokenizer, codec_model, settings, loaded.speakers)

    @property
    def sample_rate(self) -> int:
        return int(self.codec.sample_rate)

    def speaker_id(self, speaker: int | str) -> int | str:
        """A speaker name -> its id from the checkpoint's map; unknown names and ids are errors."""
        return resolve_speaker(speaker, self.speakers)

    def set_voice(
        self, audio: object, texts: object, max_seconds: float | None = 30.0, clips: list | None = None
    ) -> None:
        """Voice prompt: reference clip(s) and their transcripts (None, None: none); ``clips`` as
        ``load_references`` takes them (already read by the caller)."""
        speaker = self.speaker_id(self.settings.speaker)
        self.context = load_references(audio, texts, speaker, self.codec, max_seconds, clips)

    def pieces(self, request: Request) -> list[str]:
        s = self.settings
        if request.prompt_ids is not None:
            return [request.text]
        pieces = split_sentences(request.text, s.max_sentence_chars, s.min_sentence_chars) if s.split_sentences else [request.text]  # fmt: skip
        if not [p for p in pieces if p.strip()]:
            raise SynthesisError("an utterance is empty")
        return pieces

    def prompt(self, piece: str, speaker: int | str, previous: Segment | None, ids: list[int] | None = None,
               context: list[Segment] | None = None) -> tuple[tuple[Tensor, Tensor], int, int]:  # fmt: skip
        """Prompt rows, frame limit and EOS floor of one piece; the previous piece is dropped if it leaves no room.
        ``context``: the segments before the piece (None: the voice prompt)."""
        s = self.settings
        limit = max_frames(piece, s.max_audio_seconds, s.bound)
        floor = min(limit - 1, math.floor(FRAME_RATE * s.bound.min_seconds_per_char * len(piece)))
        if ids is not None:
            rows = text_rows(ids)
        else:
            if self.tokenizer is None:
                raise SynthesisError("this Synthesizer has no tokenizer: give requests their prompt_ids")
            base = self.context if context is None else context
            rows = build_prompt(
                self.tokenizer, piece, speaker, base + ([previous] if previous is not None else [])
            )
            if previous is not None and rows[0].shape[0] + limit > self.max_len:
                rows = build_prompt(self.tokenizer, piece, speaker, base)
        if rows[0].shape[0] >= self.max_len:
            raise SynthesisError(
                f"the prompt takes {rows[0].shape[0]} of the model's {self.max_len} positions: "
                "use a shorter reference_audio or text"
            )
        return rows, limit, max(floor, 0)

    def _decode(self, codes: Tensor) -> Tensor:
        if codes.shape[1] == 0:
            return torch.zeros(0)
        return self.codec.decode(codes[None].to(self.device))[0, 0].float().cpu()  # [frames * spf]

    def synthesize(self, requests: Sequence[Request | str], on_chunk: OnChunk | None = None) -> list[Result]:
        """Generate every request (in batches of ``settings.batch_size``); one Result each, in order.

        ``on_chunk(i, audio)`` streams: it receives request i's audio as it is made (pauses included).
        """
        reqs = [r if isinstance(r, Request) else Request(str(r)) for r in requests]
        bs = max(1, int(self.settings.batch_size))
        results: list[Result] = []
        for start in range(0, len(reqs), bs):
            results += self._batch(reqs[start : start + bs], start, on_chunk)
        return results

    def stream(self, request: Request | str) -> Iterator[Tensor]:
        """The audio of one request as chunks [n] float32, yielded while the next ones are generated."""
        chunks: queue.Queue = queue.Queue()
        done = object()

        def work() -> None:
            try:
                self.synthesize([request], on_chunk=lambda _i, a: chunks.put(a))
                chunks.put(done)
            except BaseException as err:  # handed to the consumer
                chunks.put(err)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while (item := chunks.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
        thread.join()

    @torch.inference_mode()
    def _batch(self, reqs: list[Request], start: int, on_chunk: OnChunk | None) -> list[Result]:
        s, spf = self.settings, self.codec.samples_per_frame
        t0 = time.perf_counter()
        speakers = [self.speaker_id(s.speaker if r.speaker is None else r.speaker) for r in reqs]
        seeds = [int(s.seed) + start + b + 1 if r.seed is None else int(r.seed) for b, r in enumerate(reqs)]
        gens = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        sampling = SamplingConfig(s.temperature, s.top_k, s.depth_temperature)
        pause = torch.zeros(round(s.pause_ms / 1000 * self.sample_rate))
        pieces = [self.pieces(r) for r in reqs]
        total, done = sum(len(p) for p in pieces), 0
        first: list[float | None] = [None] * len(reqs)
        audio: list[list[Tensor]] = [[] for _ in reqs]
        codes_out: list[list[Tensor]] = [[] for _ in reqs]
        eos_out: list[list[bool]] = [[] for _ in reqs]
        previous: list[Segment | None] = [None] * len(reqs)

        def emit(b: int, chunk: Tensor) -> None:
            if first[b] is None:
                first[b] = time.perf_counter() - t0
            audio[b].append(chunk)
            if on_chunk is not None:
                on_chunk(start + b, chunk)

        for r in range(max(len(p) for p in pieces)):
            active = [b for b in range(len(reqs)) if r < len(pieces[b])]
            built = [
                self.prompt(pieces[b][r], speakers[b], previous[b], reqs[b].prompt_ids, reqs[b].context)
                for b in active
            ]
            tokens, mask, pads = left_pad([rows for rows, _, _ in built])  # [A, S, 33] x2, [A]
            room = self.max_len - tokens.shape[1]  # the batch's KV cache holds S + frames positions
            limits = torch.tensor([min(limit, room) for _, limit, _ in built])  # [A]
            floors = torch.tensor([floor for _, _, floor in built])  # [A]
            if r > 0:
                for b in active:
                    emit(b, pause)
            args = (self.model, tokens, mask, limits, sampling, [gens[b] for b in active], pads)
            if on_chunk is not None:
                with self.codec.streaming_decoder(len(active)) as step:

                    def emit_active(a: int, chunk: Tensor, active: list[int] = active) -> None:
                        emit(active[a], chunk)

                    sink = StreamSink(step, emit_active, len(active), s.stream_chunk_frames, spf)
                    codes, lengths = generate(*args, on_frame=sink, min_frames=floors)
                    sink.flush()
            else:
                codes, lengths = generate(*args, min_frames=floors)
            for a, b in enumerate(active):
                n = int(lengths[a])
                piece_codes = codes[a, :, :n]  # [32, n]
                ended = n < int(limits[a])  # an EOS frame came before the limit
                if not ended:
                    log.warning("request %d piece %d: no end-of-speech within %d frames (%.1f s); cut there",
                                start + b + 1, r + 1, n, n / FRAME_RATE)  # fmt: skip
                codes_out[b].append(piece_codes)
                eos_out[b].append(ended)
                if on_chunk is None:
                    emit(b, self._decode(piece_codes))
                keep = s.carry_context and ended and n > 0 and reqs[b].prompt_ids is None
                previous[b] = Segment(pieces[b][r], speakers[b], piece_codes) if keep else None
            done += len(active)
            if total > 1:
                log.info("pieces %d/%d done", done, total)
        seconds = time.perf_counter() - t0
        results = []
        for b in range(len(reqs)):
            first_chunk = first[b] if on_chunk is not None else None
            wav = torch.cat(audio[b]) if audio[b] else torch.zeros(0)
            frames = sum(int(c.shape[1]) for c in codes_out[b])
            length = wav.numel() / self.sample_rate
            metrics = {
                "pieces": len(pieces[b]),
                "frames": frames,
                "audio_seconds": round(length, 4),
                "generation_seconds": round(seconds, 4),
                "rtf": round(seconds / length, 4) if length > 0 else None,
                "frames_per_second": round(frames / seconds, 2) if seconds > 0 else None,
                "first_chunk_seconds": None if first_chunk is None else round(first_chunk, 4),
                "eos": all(eos_out[b]),
                "batch_size": len(reqs),
                "seed": seeds[b],
            }
            results.append(Result(wav, self.sample_rate, codes_out[b], eos_out[b], metrics))
        return results


def resolve_speaker(speaker: int | str, speakers: dict[str, int]) -> int | str:
    """``speaker`` as the id written in prompts: a name is looked up in ``speakers`` (name -> id)."""
    if isinstance(speaker, str) and speaker.strip().lstrip("-").isdigit():
        speaker = int(speaker)
    if isinstance(speaker, int) and not isinstance(speaker, bool):
        if speakers and speaker not in speakers.values():
            raise SynthesisError(
                f"speaker={speaker} is not a speaker of this model; known: {_known(speakers)}"
            )
        return speaker
    name = str(speaker)
    if name in speakers:
        return speakers[name]
    if not speakers:
        raise SynthesisError(f"speaker={name}: this model records no speaker names; use a speaker id (0)")
    raise SynthesisError(f"unknown speaker {name!r}; known: {_known(speakers)}")


def _known(speakers: dict[str, int]) -> str:
    return ", ".join(f"{name} ({i})" for name, i in sorted(speakers.items(), key=lambda kv: kv[1]))
