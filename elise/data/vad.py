"""Where people speak in a recording (silero-vad) and where to cut it into clips: at pauses.

``speech_spans`` finds the spans of speech separated by pauses of at least ``min_pause`` seconds;
``plan_clips`` groups them into clips of ``min_clip``..``max_clip`` seconds whose edges lie in the
pauses (at most ``pad`` seconds of silence around the speech, and never past the middle of a pause,
so two clips never share audio). silero-vad's package carries its weights: nothing is downloaded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

VAD_RATE = 16_000  # silero-vad takes 16 kHz


@functools.lru_cache(maxsize=1)
def _model() -> Any:
    try:
        from silero_vad import load_silero_vad
    except ImportError as err:
        raise ImportError(f"data=folder needs silero-vad: pip install 'elise[voice]' ({err})") from err
    return load_silero_vad()  # the TorchScript weights inside the package


def speech_spans(
    wav: np.ndarray, threshold: float = 0.5, min_pause: float = 0.3, max_span: float = 20.0
) -> list[tuple[float, float]]:
    """Speech spans ``(start, end)`` in seconds of mono float32 16 kHz audio [N].

    Spans are separated by at least ``min_pause`` seconds of non-speech; speech longer than
    ``max_span`` is split at its longest short silence (silero's own rule).
    """
    import torch
    from silero_vad import get_speech_timestamps

    stamps = get_speech_timestamps(
        torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)),
        _model(),
        threshold=threshold,
        sampling_rate=VAD_RATE,
        min_silence_duration_ms=int(min_pause * 1000),
        speech_pad_ms=0,
        max_speech_duration_s=max_span,
    )
    return [(s["start"] / VAD_RATE, s["end"] / VAD_RATE) for s in stamps]


@dataclass
class Piece:
    """Consecutive speech spans ``first..last`` (indices) that become one clip, and their texts."""

    first: int
    last: int
    texts: list[str] = field(default_factory=list)


def group_seconds(spans: list[tuple[float, float]], piece: Piece, pad: float) -> float:
    return spans[piece.last][1] - spans[piece.first][0] + 2 * pad


def merge_short(
    spans: list[tuple[float, float]], pieces: list[Piece], min_clip: float, max_clip: float, pad: float
) -> tuple[list[Piece], list[Piece]]:
    """Merge each piece shorter than ``min_clip`` into the neighbour across the shorter pause while the
    result stays within ``max_clip``. Returns (kept pieces, pieces still too short: dropped)."""
    pieces = list(pieces)
    stuck: set[int] = set()  # first-span index of short pieces no neighbour can take
    while True:
        short = [
            i
            for i, p in enumerate(pieces)
            if group_seconds(spans, p, pad) < min_clip and p.first not in stuck
        ]
        if not short:
            break
        i = min(short, key=lambda k: group_seconds(spans, pieces[k], pad))
        options = []
        for j in (i - 1, i + 1):
            if 0 <= j < len(pieces):
                a, b = sorted((i, j))
                merged = Piece(pieces[a].first, pieces[b].last, pieces[a].texts + pieces[b].texts)
                if group_seconds(spans, merged, pad) <= max_clip:
                    gap = spans[pieces[b].first][0] - spans[pieces[a].last][1]
                    options.append((gap, a, merged))
        if not options:
            stuck.add(pieces[i].first)
            continue
        _, a, merged = min(options, key=lambda o: o[0])
        pieces[a : a + 2] = [merged]
    kept = [p for p in pieces if group_seconds(spans, p, pad) >= min_clip]
    return kept, [p for p in pieces if group_seconds(spans, p, pad) < min_clip]


def clip_bounds(
    spans: list[tuple[float, float]], piece: Piece, total: float, pad: float
) -> tuple[float, float]:
    """Start and end (seconds) of a piece's clip: ``pad`` around its speech, within the pauses."""
    start, end = spans[piece.first][0] - pad, spans[piece.last][1] + pad
    if piece.first > 0:
        start = max(start, (spans[piece.first - 1][1] + spans[piece.first][0]) / 2)
    if piece.last + 1 < len(spans):
        end = min(end, (spans[piece.last][1] + spans[piece.last + 1][0]) / 2)
    return max(start, 0.0), min(end, total)


def plan_clips(
    spans: list[tuple[float, float]], min_clip: float, max_clip: float, pad: float
) -> tuple[list[Piece], list[Piece]]:
    """One piece per speech span, short ones merged with a neighbour: (clips, dropped too-short pieces)."""
    return merge_short(spans, [Piece(i, i) for i in range(len(spans))], min_clip, max_clip, pad)


def plan_text_clips(
    spans: list[tuple[float, float]], texts: list[str], min_clip: float, max_clip: float, pad: float
) -> list[Piece] | None:
    """Cut at the ``len(texts) - 1`` longest pauses so that each piece holds one text (sentence/line),
    short pieces merged with a neighbour. None when that cannot give clips of at most ``max_clip``
    (fewer pauses than texts, or a piece too long). A short piece no neighbour can take is kept: its
    text is the user's, and preparation's ``min_seconds`` decides."""
    if not spans or len(spans) < len(texts):
        return None
    gaps = sorted(range(1, len(spans)), key=lambda i: spans[i][0] - spans[i - 1][1], reverse=True)
    cuts = sorted(gaps[: len(texts) - 1])
    edges = [0, *cuts, len(spans)]
    pieces = [Piece(edges[k], edges[k + 1] - 1, [texts[k]]) for k in range(len(texts))]
    kept, short = merge_short(spans, pieces, min_clip, max_clip, pad)
    pieces = sorted(kept + short, key=lambda p: p.first)
    if any(group_seconds(spans, p, pad) > max_clip for p in pieces):
        return None
    return pieces
