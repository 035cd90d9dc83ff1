"""Prompt rows for generation: voice-prompt context segments, then the target text, no audio.

A context segment has exactly the layout of a training segment: the text rows of
``[{speaker}]{transcript}``, its audio rows, then the EOS row. Sesame's CSM generator does the same
(it appends an all-zero EOS frame to every context clip), so the model sees, after the target's
text rows, the same pattern it was trained on: speech follows text, and a segment ends with EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from elise.codec.base import Codec
from elise.data.audio import TARGET_SR, AudioError, read_audio
from elise.layout import segment_rows, text_rows
from elise.synthesis.errors import SynthesisError, one_line
from elise.text import Tokenizer, encode_prompt

Rows = tuple[Tensor, Tensor]  # tokens [n, 33] long, mask [n, 33] bool


@dataclass
class Segment:
    """A spoken segment used as context: its transcript, speaker and codes [32, T]."""

    text: str
    speaker: int | str
    codes: Tensor

    def rows(self, tokenizer: Tokenizer) -> Rows:
        return segment_rows(encode_prompt(tokenizer, self.text, self.speaker), self.codes, eos=True)


def as_list(value: object) -> list:
    """None -> [], a scalar -> [it], a list/ListConfig -> list."""
    if value is None:
        return []
    if isinstance(value, str | Path | int | float):
        return [value]
    return list(value)  # type: ignore[call-overload]


MIN_REFERENCE_SECONDS = 1.0
SILENT_PEAK = 1e-3  # a clip whose loudest sample is below this (-60 dBFS) holds no voice


def check_references(
    audio: object, texts: object, max_seconds: float | None = 30.0, sample_rate: int = TARGET_SR
) -> list[tuple[str, str, np.ndarray]]:
    """Read and check voice-prompt clips before any model loads: (path, transcript, mono wav [N]) each.

    ``audio`` and ``texts`` are a path/transcript or equal-length lists of them; every clip must be
    readable, not silent and last between 1 s and ``max_seconds``.
    """
    paths, transcripts = [str(p) for p in as_list(audio)], [str(t) for t in as_list(texts)]
    if paths and not transcripts:
        raise SynthesisError(f"reference_audio={paths[0]} needs reference_text (the words spoken in it)")
    if transcripts and not paths:
        raise SynthesisError("reference_text is set but reference_audio is not; pass both or neither")
    if len(paths) != len(transcripts):
        raise SynthesisError(
            f"{len(paths)} reference_audio file(s) but {len(transcripts)} reference_text(s); give one text per file"
        )
    clips = []
    for path, transcript in zip(paths, transcripts, strict=True):
        if not transcript.strip():
            raise SynthesisError(f"reference_text for {path} is empty")
        if Path(path).is_dir():
            raise SynthesisError(f"reference_audio={path} is a directory")
        try:
            wav = read_audio(path, sample_rate)  # [N] float32, mono at the codec's rate
        except FileNotFoundError as err:
            raise SynthesisError(f"reference_audio={path} not found") from err
        except (AudioError, OSError) as err:
            raise SynthesisError(f"cannot read reference audio {path}: {one_line(err)}") from err
        seconds = wav.size / sample_rate
        if seconds < MIN_REFERENCE_SECONDS:
            raise SynthesisError(
                f"reference audio {path} lasts {seconds:.2f} s; it needs at least 1 s of speech"
            )
        if max_seconds is not None and seconds > max_seconds:
            raise SynthesisError(
                f"reference audio {path} lasts {seconds:.1f} s; the limit is reference_max_seconds={max_seconds} "
                "(a long prompt leaves no room to generate)"
            )
        if float(np.abs(wav).max()) < SILENT_PEAK:
            raise SynthesisError(f"reference audio {path} is silent")
        clips.append((path, " ".join(transcript.split()), wav))
    return clips


def load_references(
    audio: object,
    texts: object,
    speaker: int | str,
    codec: Codec,
    max_seconds: float | None = 30.0,
    clips: list[tuple[str, str, np.ndarray]] | None = None,
) -> list[Segment]:
    """Check, read and encode voice-prompt clips (any format soundfile reads, any rate or channel count).
    ``clips``: ``check_references``' output at ``TARGET_SR`` when the caller read them already."""
    if clips is None or codec.sample_rate != TARGET_SR:
        clips = check_references(audio, texts, max_seconds, codec.sample_rate)
    segments = []
    for _path, transcript, wav in clips:
        x = torch.from_numpy(wav).to(torch.float32)[None, None]  # [1, 1, N]
        codes, frames = codec.encode(x)  # [1, 32, T], [1]
        segments.append(Segment(transcript, speaker, codes[0, :, : int(frames[0])].cpu().long()))
    return segments


def build_prompt(
    tokenizer: Tokenizer, text: str, speaker: int | str, context: Sequence[Segment] = ()
) -> Rows:
    """Context segments (text + audio + EOS rows each), then the text rows of ``[{speaker}]{text}``."""
    parts = [seg.rows(tokenizer) for seg in context]
    parts.append(text_rows(encode_prompt(tokenizer, text, speaker)))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
