"""Per-utterance metrics: text normalisation, WER/CER, expected duration.

Transcript and text go through the same normaliser: the Whisper English normaliser transformers ships
(``EnglishTextNormalizer``: case, punctuation, contractions, titles, numbers as digits, bracketed tags
such as ``<laughs>`` removed), with Whisper's British -> American spelling map
(``elise/assets/eval/english_spelling.json``, see its NOTICE), so "It's 3 o'clock, Dr. Smith." and
"it is three o'clock doctor smith" are the same words, and so are "colour" and "color".
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

SECONDS_PER_CHAR = 0.065  # normal English speech (~15 characters/s): the duration_ratio's denominator


SPELLING = Path(__file__).resolve().parents[1] / "assets" / "eval" / "english_spelling.json"


@cache
def _normaliser() -> Any:
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    # the map Whisper's tokenizer reads from a hub model's normalizer.json, shipped: evaluation runs offline
    return EnglishTextNormalizer(json.loads(SPELLING.read_text(encoding="utf-8")))


def normalise(text: str) -> str:
    """``text`` as compared: lower case, no punctuation, numbers in digits, single spaces."""
    return " ".join(_normaliser()(text).split())


def edit_distance(ref: list[str] | str, hyp: list[str] | str) -> int:
    """Levenshtein distance (substitutions, insertions, deletions) between two sequences."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def error_rate(ref: list[str] | str, hyp: list[str] | str) -> float:
    """Edits / reference length (an empty reference: 0 if the hypothesis is empty too, else 1)."""
    if not ref:
        return 0.0 if not hyp else 1.0
    return edit_distance(ref, hyp) / len(ref)


def wer(text: str, transcript: str) -> float:
    """Word error rate of ``transcript`` against ``text``, both normalised."""
    return error_rate(normalise(text).split(), normalise(transcript).split())


def cer(text: str, transcript: str) -> float:
    """Character error rate (spaces count as characters), both normalised."""
    return error_rate(normalise(text), normalise(transcript))


def expected_seconds(text: str) -> float:
    """Seconds a speaker needs for ``text`` at a normal pace (tags such as ``<laughs>`` left out)."""
    return max(len(normalise(text)), 1) * SECONDS_PER_CHAR


def duration_ratio(text: str, seconds: float) -> float:
    """Audio seconds / expected seconds: well below 1 is a cut, well above a tail or a slow voice."""
    return seconds / expected_seconds(text)
