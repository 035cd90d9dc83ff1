"""What gets scored: the evaluation set's texts, and existing audio with its texts (``audio=``).

- Evaluation set: ``default`` (the bundled ``elise/assets/eval/default.jsonl``: 110 English sentences
  of 11 kinds and 10 paragraphs) or a JSONL file of ``{"text": ..., "id"?: ..., "kind"?: ...}`` lines,
  or a plain text file with one utterance per line.
- ``audio=``: an LJSpeech-style folder (``metadata.csv`` + ``wavs/``, as ``data=ljspeech`` reads), a
  folder of audio files each beside a ``.txt`` of its text, or a JSONL manifest as ``data=manifest``
  reads (``audio``, ``text``, optional ``speaker``) with an optional ``reference`` audio path per line.
Unreadable or text-less entries are counted by reason and skipped.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from elise.data.audio import AudioError, read_audio
from elise.data.sources import AUDIO_SUFFIXES, read_ljspeech, read_manifest

DEFAULT_SET = Path(__file__).resolve().parents[1] / "assets" / "eval" / "default.jsonl"
RATE = 24_000  # audio is scored at the codec's rate; recognisers resample to their own


@dataclass
class Line:
    """One line of an evaluation set."""

    id: str
    text: str
    kind: str = "sentence"


@dataclass
class Item:
    """One utterance to score: its text, audio and what is known about how it was made."""

    id: str
    text: str
    wav: str
    audio: np.ndarray  # [N] float32 at ``RATE``
    kind: str = "sentence"
    reference: str | None = None  # the voice it should match (audio path)
    eos: bool | None = None  # ended by the model's end-of-speech frame (None: not synthesized here)
    rtf: float | None = None
    voice: int | None = None  # index of the reference voice it was made with
    conversation: str | None = None  # a conversation's turn (dialogue mode): the script's name
    turn: int | None = None  # and the turn's number (1-based)


@dataclass
class Skipped:
    """Entries left out, counted by reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, detail)


def read_eval_set(name: str | Path, limit: int | None = None, kinds: list[str] | None = None) -> list[Line]:
    """The lines of an evaluation set (``default`` or a file), optionally only some kinds, at most ``limit``."""
    path = DEFAULT_SET if str(name) == "default" else Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"eval_set not found: {path}")
    lines = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(raw)
                text = row["text"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path} line {n}: not a JSON object with a 'text' ({err})") from err
            lines.append(
                Line(str(row.get("id") or f"{n:04d}"), str(text).strip(), str(row.get("kind", "sentence")))
            )
        else:
            lines.append(Line(f"{n:04d}", raw.strip()))
    if kinds:
        lines = [line for line in lines if line.kind in kinds]
    lines = [line for line in lines if line.text]
    return lines[:limit] if limit else lines


def read_audio_items(source: str | Path, skipped: Skipped, limit: int | None = None) -> list[Item]:
    """Scorable items of an ``audio=`` folder or manifest (bad entries go to ``skipped``)."""
    path = Path(source).expanduser()
    references: list[str | None] = []
    if path.is_dir() and (path / "metadata.csv").is_file():
        raw = read_ljspeech(path)
        references = [None] * len(raw)
    elif path.is_dir():
        raw_pairs = []
        for audio in sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
            text_file = audio.with_suffix(".txt")
            text = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else ""
            raw_pairs.append((audio, text))
        if not raw_pairs:
            raise FileNotFoundError(f"audio={path}: no metadata.csv and no audio files in the folder")
        return _load([(a.stem, t, a, None) for a, t in raw_pairs], skipped, limit)
    elif path.is_file():
        raw = read_manifest(path)
        for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
            if line.strip():
                row = _json_or_none(line)
                ref = row.get("reference") if isinstance(row, dict) else None
                references.append(str(ref if Path(ref).is_absolute() else path.parent / ref) if ref else None)
    else:
        raise FileNotFoundError(f"audio={path}: no such folder or manifest")
    entries = []
    for item, ref in zip(raw, references, strict=True):
        if item.error:
            skipped.add(item.error[0], item.error[1])
            continue
        entries.append((item.id, item.text, item.audio, ref))
    return _load(entries, skipped, limit)


def _json_or_none(line: str) -> object:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _load(entries: list, skipped: Skipped, limit: int | None) -> list[Item]:
    items: list[Item] = []
    for item_id, text, audio, ref in entries:
        if limit and len(items) >= limit:
            break
        if not text:
            skipped.add("no_text", str(item_id))
            continue
        try:
            wav = read_audio(audio, RATE)
        except (FileNotFoundError, AudioError) as err:
            skipped.add("unreadable_audio", f"{item_id}: {err}")
            continue
        if wav.size == 0:
            skipped.add("empty_audio", str(item_id))
            continue
        items.append(Item(str(item_id), text, str(audio), wav, reference=ref))
    return items
