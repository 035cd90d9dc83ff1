"""Text handling for synthesis: reading texts, splitting long text into sentences, the length bound.

Long text is generated sentence by sentence (a model trained on single clips garbles minutes-long
inputs); each piece gets a frame budget scaled from its length instead of a fixed cap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from elise.synthesis.errors import SynthesisError, one_line

FRAME_RATE = 12.5  # Mimi frames per second

# a sentence ends at . ! ? ; or an ellipsis, optionally followed by closing quotes/brackets, then space
_SENTENCE_END = re.compile(r"(?<=[.!?;…])([\"'”’)\]]*)\s+")
# abbreviations whose trailing period does not end a sentence
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "fig", "mt", "approx",
}  # fmt: skip
_INITIALS = re.compile(r"([a-z]\.)+[a-z]|[a-z]")  # p.m. e.g. U.S. J. (a single initial)
_CLAUSE_END = re.compile(r"(?<=[,:—–])\s+|\s+(?=[—–-]\s)")


@dataclass
class LengthBound:
    """Frame budget of one generated piece of text (used when ``max_audio_seconds`` is not set).

    ``frames = ceil(12.5 * (extra_seconds + margin * seconds_per_char * chars))``: speech runs at
    roughly 0.06-0.12 s per character, so the default (0.12 s/char, margin 2, plus 3 s) leaves about
    four times the usual duration before a piece that never emits EOS is cut. No piece may end
    before ``min_seconds_per_char * chars`` (about half the usual duration).
    """

    seconds_per_char: float = 0.12
    margin: float = 2.0
    extra_seconds: float = 3.0
    min_seconds_per_char: float = 0.05

    def frames(self, text: str) -> int:
        seconds = self.extra_seconds + self.margin * self.seconds_per_char * len(text)
        return max(1, math.ceil(FRAME_RATE * seconds))


def max_frames(text: str, max_audio_seconds: float | None, bound: LengthBound) -> int:
    """Frame limit for ``text``: a fixed ``max_audio_seconds`` when given, else the text-scaled bound."""
    if max_audio_seconds is not None:
        if max_audio_seconds <= 0:
            raise SynthesisError(f"max_audio_seconds must be > 0, got {max_audio_seconds}")
        return max(1, math.ceil(FRAME_RATE * max_audio_seconds))
    return bound.frames(text)


def normalize(text: str) -> str:
    """Collapse whitespace (newlines included) to single spaces."""
    return " ".join(str(text).split())


def split_sentences(text: str, max_chars: int = 180, min_chars: int = 12) -> list[str]:
    """Split text into pieces of at most ``max_chars`` characters, at sentence ends where possible.

    Sentences end at . ! ? ; (not after common abbreviations such as "Dr."); a longer sentence is cut
    at clause marks (, : dashes), then between words; a word longer than ``max_chars`` is cut as is.
    A piece shorter than ``min_chars`` ("Hi.") is joined to its neighbour when the result still fits.
    """
    text = normalize(text)
    if not text:
        return []
    pieces: list[str] = []
    for sentence in _sentences(text):
        pieces.extend(_fit(sentence, max_chars))
    return _merge_short(pieces, max_chars, min_chars)


def _sentences(text: str) -> list[str]:
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        words = text[start : m.start()].split()
        last = words[-1].lower().rstrip(".\"'”’)]") if words else ""
        if text[m.start() - 1] == "." and (last in _ABBREVIATIONS or _INITIALS.fullmatch(last)):
            continue
        out.append(text[start : m.end(1)].strip())  # closing quotes stay with their sentence
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def _fit(sentence: str, max_chars: int) -> list[str]:
    """Cut one sentence into pieces <= max_chars: clause marks first, then word boundaries."""
    if len(sentence) <= max_chars:
        return [sentence]
    clauses = [c for c in _CLAUSE_END.split(sentence) if c.strip()]
    if len(clauses) > 1:
        return _pack(clauses, max_chars, lambda c: _fit(c, max_chars))
    words = sentence.split()
    if len(words) > 1:
        return _pack(words, max_chars, lambda w: [w[i : i + max_chars] for i in range(0, len(w), max_chars)])
    return [sentence[i : i + max_chars] for i in range(0, len(sentence), max_chars)]


def _pack(parts: list[str], max_chars: int, cut) -> list[str]:
    """Greedily join consecutive parts with spaces while the result fits; ``cut`` splits an oversized part."""
    out: list[str] = []
    for part in parts:
        for p in cut(part) if len(part) > max_chars else [part]:
            if out and len(out[-1]) + 1 + len(p) <= max_chars:
                out[-1] = f"{out[-1]} {p}"
            else:
                out.append(p)
    return out


def _merge_short(pieces: list[str], max_chars: int, min_chars: int) -> list[str]:
    out: list[str] = []
    for p in pieces:
        if (
            out
            and (len(p) < min_chars or len(out[-1]) < min_chars)
            and len(out[-1]) + 1 + len(p) <= max_chars
        ):
            out[-1] = f"{out[-1]} {p}"
        else:
            out.append(p)
    return out


def read_text_file(path: str | Path) -> list[str]:
    """Utterances of a text file: one per line, blank lines skipped, whitespace normalised."""
    path = Path(path)
    if path.is_dir():
        raise SynthesisError(f"text_file={path} is a directory; give a text file with one utterance per line")
    if not path.is_file():
        raise SynthesisError(f"text_file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SynthesisError(f"cannot read text_file {path}: {one_line(err)}") from err
    texts = [normalize(line) for line in lines if line.strip()]
    if not texts:
        raise SynthesisError(f"text_file {path} has no text (only blank lines)")
    return texts
