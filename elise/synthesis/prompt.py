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

import torch
from torch import Tensor

from elise.codec.base import Codec
from elise.data.audio import AudioError, read_audio
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


def load_references(
    audio: object, texts: object, speaker: int | str, codec: Codec, max_seconds: float | None = None
) -> list[Segment]:
    """Read and encode voice-prompt clips (any format soundfile reads, any rate or channel count).

    ``audio`` and ``texts`` are a path/transcript or equal-length lists of them.
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
    segments = []
    for path, transcript in zip(paths, transcripts, strict=True):
        if not transcript.strip():
            raise SynthesisError(f"reference_text for {path} is empty")
        try:
            wav = read_audio(path, codec.sample_rate)  # [N] float32, mono at the codec's rate
        except (FileNotFoundError, AudioError, OSError) as err:
            raise SynthesisError(f"cannot read reference audio {path}: {one_line(err)}") from err
        if wav.size == 0:
            raise SynthesisError(f"reference audio {path} has no samples")
        if max_seconds is not None and wav.size > max_seconds * codec.sample_rate:
            raise SynthesisError(
                f"reference audio {path} lasts {wav.size / codec.sample_rate:.1f} s; "
                f"the limit is reference_max_seconds={max_seconds} (a long prompt leaves no room to generate)"
            )
        x = torch.from_numpy(wav).to(torch.float32)[None, None]  # [1, 1, N]
        codes, frames = codec.encode(x)  # [1, 32, T], [1]
        segments.append(
            Segment(" ".join(transcript.split()), speaker, codes[0, :, : int(frames[0])].cpu().long())
        )
    return segments


def build_prompt(
    tokenizer: Tokenizer, text: str, speaker: int | str, context: Sequence[Segment] = ()
) -> Rows:
    """Context segments (text + audio + EOS rows each), then the text rows of ``[{speaker}]{text}``."""
    parts = [seg.rows(tokenizer) for seg in context]
    parts.append(text_rows(encode_prompt(tokenizer, text, speaker)))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
