"""Voices: a voice is a prompt (reference codes + their transcript + a speaker id), or a speaker of the
checkpoint (its name, or ``default``: ``speaker`` of the config without a reference).

Uploaded voices are encoded once (``elise.synthesis.load_references``: the engine's checks and
codec) and kept in ``voices_dir`` in the stored-voice files of ``elise.synthesis.stored`` (which
``synthesize.py voices=<folder>`` reads too). Names are 1-64 letters, digits, ``_`` or ``-`` (never a
path), so no file escapes ``voices_dir``. Reads, writes and deletes hold one lock, so a request never
sees a voice half replaced or half deleted.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from elise.synthesis import Segment, SynthesisError, Synthesizer, load_references
from elise.synthesis.stored import (
    StoredVoice,
    delete_stored,
    is_stored,
    read_stored,
    stored_paths,
    write_stored,
)

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
DEFAULT = "default"


class VoiceError(ValueError):
    """A bad voice request (a 400 or 404 for the client); ``status`` says which."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Voice:
    name: str
    speaker: int | str
    context: list[Segment]
    kind: str  # "speaker" (of the checkpoint) or "uploaded"
    text: str = ""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise VoiceError(
            f"voice name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


class VoiceStore:
    """The voices of one server: the checkpoint's speakers and the uploads kept in ``voices_dir``."""

    def __init__(self, synth: Synthesizer, voices_dir: str | Path | None, max_seconds: float = 30.0):
        self.synth, self.max_seconds = synth, max_seconds
        self.dir = Path(voices_dir) if voices_dir else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.builtin = {DEFAULT: synth.settings.speaker, **{name: i for name, i in synth.speakers.items()}}

    def names(self) -> list[dict]:
        out = [{"name": n, "kind": "speaker"} for n in self.builtin]
        if self.dir is not None:
            for meta in sorted(self.dir.glob("*.json")):
                if (
                    NAME.fullmatch(meta.stem)
                    and meta.stem not in self.builtin
                    and is_stored(self.dir, meta.stem)
                ):
                    out.append({"name": meta.stem, "kind": "uploaded"})
        return out

    def get(self, name: str) -> Voice:
        """The voice called ``name``; VoiceError (400) when there is none (or its files are unreadable)."""
        if name in self.builtin:
            return Voice(name, self.synth.speaker_id(self.builtin[name]), [], "speaker")
        if self.dir is None or not NAME.fullmatch(str(name)):
            raise VoiceError(f"unknown voice {name!r}; GET /v1/audio/voices lists them")
        with self.lock:
            if not is_stored(self.dir, name):
                raise VoiceError(f"unknown voice {name!r}; GET /v1/audio/voices lists them")
            try:
                stored = read_stored(self.dir, name)
            except SynthesisError as err:
                raise VoiceError(f"{err}; upload it again") from err
        if stored.codec != self.codec_identity():
            raise VoiceError(
                f"voice {name!r} was encoded with another codec ({stored.codec}); upload it again"
            )
        seg = Segment(stored.text, stored.speaker, stored.codes)
        return Voice(name, stored.speaker, [seg], "uploaded", stored.text)

    def codec_identity(self) -> str:
        return str(self.synth.codec.identity)

    def add(self, name: str, audio: bytes, text: str, speaker: int | str | None = None) -> Voice:
        """Encode an uploaded clip (any format soundfile reads, 1 s to ``max_seconds``) and keep it."""
        check_name(name)
        if self.dir is None:
            raise VoiceError("this server keeps no voices: start it with voices_dir=<folder>")
        if name in self.builtin:
            raise VoiceError(f"voice {name!r} is a speaker of the checkpoint; pick another name")
        if not text or not text.strip():
            raise VoiceError("the voice needs its transcript (the words spoken in the clip)")
        try:
            sid = self.synth.speaker_id(self.synth.settings.speaker if speaker in (None, "") else speaker)
        except SynthesisError as err:
            raise VoiceError(str(err)) from err
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "upload"
            path.write_bytes(audio)
            try:
                segments = load_references(str(path), text, sid, self.synth.codec, self.max_seconds)
            except SynthesisError as err:
                raise VoiceError(str(err).replace(str(path), "the uploaded audio")) from err
        seg = segments[0]
        with self.lock:
            write_stored(self.dir, name, StoredVoice(seg.text, sid, self.codec_identity(), seg.codes))
        log.info("voice %s added (%d frames)", name, seg.codes.shape[1])
        return Voice(name, sid, [seg], "uploaded", seg.text)

    def delete(self, name: str) -> None:
        check_name(name)
        if name in self.builtin:
            raise VoiceError(f"voice {name!r} is a speaker of the checkpoint; it cannot be deleted")
        with self.lock:
            if self.dir is None or not any(p.is_file() for p in stored_paths(self.dir, name)):
                raise VoiceError(f"no voice {name!r}", status=404)
            delete_stored(self.dir, name)
