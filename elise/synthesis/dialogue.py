"""Conversations: a script of ``<speaker>: <text>`` turns in, one conversation out.

Every turn is generated with the conversation so far as context, the way CSM was trained: the voice
prompts of the script's speakers (reference clips given as ``voices``), then the previous turns (their
text and the codes just generated, one segment each), then the turn's text. When that would not fit
in the model's positions together with the turn's frame limit, the oldest turns are left out (the
voice prompts always stay) and the log says so; ``context_turns`` caps the turns kept.

Several scripts are independent conversations generated side by side: round k generates turn k of
every conversation that has one, as one engine batch (``Request.context`` carries each conversation's
own context). Turn k of conversation c samples with seed ``settings.seed + 1000 * c + k + 1``, so the
audio does not depend on ``batch_size``, except that prompts of a batch are left-padded to the longest:
when the longest prompt would leave another item's turn too few positions, it gives up old turns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from elise.synthesis.engine import OnChunk, Request, Result, Synthesizer, resolve_speaker
from elise.synthesis.errors import SynthesisError, one_line
from elise.synthesis.prompt import Segment, check_references, load_references
from elise.synthesis.stored import StoredVoice, is_stored, read_stored
from elise.synthesis.text import max_frames, normalize
from elise.text import Tokenizer, encode_prompt

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
VOICE_KEYS = ("audio", "text", "speaker")
SEED_STRIDE = 1000  # conversation c's turn k samples with seed + SEED_STRIDE * c + k + 1

OnAudio = Callable[[int, Tensor], None]  # (conversation index, audio [n] float32): the joined wav, in order
# a round's requests -> their Results (on_chunk streams): Synthesizer.synthesize, or the server's model worker
Generate = Callable[[list[Request], OnChunk | None], list[Result]]


# ---- scripts ------------------------------------------------------------------------------------


@dataclass
class Turn:
    """One line of a script: its 1-based line number, the speaker as written, the text."""

    line: int
    speaker: str
    text: str


@dataclass
class Script:
    """A conversation to generate: a name (file stem), where it came from, its turns."""

    name: str
    source: str
    turns: list[Turn]


def parse_script(text: str, source: str = "dialogue", name: str = "conversation") -> Script:
    """``<speaker>: <text>`` lines -> a Script; blank lines and ``#`` comments are skipped.

    A line without a colon, with nothing before it or nothing after it is an error naming the line.
    """
    turns = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        speaker, colon, words = line.partition(":")
        speaker, words = speaker.strip(), normalize(words)
        if not colon:
            raise SynthesisError(f"{source} line {n}: no colon; write each turn as '<speaker>: <text>'")
        if not speaker:
            raise SynthesisError(f"{source} line {n}: no speaker before the colon ('<speaker>: <text>')")
        if not words:
            raise SynthesisError(f"{source} line {n}: speaker {speaker!r} has no text after the colon")
        turns.append(Turn(n, speaker, words))
    if not turns:
        raise SynthesisError(f"{source} has no turns (only blank lines and # comments)")
    return Script(name, source, turns)


def read_scripts(dialogue: object, dialogue_file: object) -> list[Script]:
    """The conversations of ``dialogue`` (inline; turns on separate lines, or separated by a typed ``\\n``)
    or ``dialogue_file`` (a script, or a folder whose ``*.txt`` scripts are independent conversations)."""
    if dialogue is not None and dialogue_file:
        raise SynthesisError("pass dialogue=... or dialogue_file=..., not both")
    if dialogue is not None:
        return [parse_script(str(dialogue).replace("\\n", "\n"))]
    path = Path(str(dialogue_file)).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise SynthesisError(f"dialogue_file={path} is a folder without .txt scripts")
        return [_read_script(p) for p in files]
    if not path.is_file():
        raise SynthesisError(f"dialogue_file not found: {path}")
    return [_read_script(path)]


def _read_script(path: Path) -> Script:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SynthesisError(f"cannot read dialogue_file {path}: {one_line(err)}") from err
    return parse_script(text, str(path), path.stem)


# ---- voices -------------------------------------------------------------------------------------


@dataclass
class Voice:
    """A speaker of the scripts: the id written in its prompts and its voice prompt (maybe none)."""

    name: str
    speaker: int | str
    clips: list[tuple[str, str, np.ndarray]] = field(default_factory=list)  # check_references' output
    prompt: list[Segment] = field(default_factory=list)  # the clips encoded (encode_voices)
    stored: StoredVoice | None = None  # a server voice (elise.synthesis.stored), encoded already


def read_voices(voices: object, max_seconds: float | None = 30.0) -> dict[str, Voice]:
    """Check and read the voices before any model loads.

    ``voices``: ``{name: {audio: a.wav | [..], text: "what it says" | [..], speaker: id or name}}``
    (each key optional; no speaker: the voice's position 0, 1, ...), or a folder: ``<name>.wav`` (or
    .flac/.mp3/.ogg) clips each with a ``<name>.txt`` transcript, and the voices the server keeps
    (``<name>.json`` + ``<name>.npy``, ``elise.serve.voices``); the i-th name in sorted order speaks
    as speaker i.
    """
    if voices is None or voices == "":
        return {}
    if isinstance(voices, str | Path):
        return _folder_voices(Path(str(voices)), max_seconds)
    if not isinstance(voices, Mapping):
        raise SynthesisError("voices= must be {name: {audio: <file>, text: <what it says>}, ...} or a folder")
    out = {}
    for i, (name, entry) in enumerate(voices.items()):
        name = str(name)
        if not isinstance(entry, Mapping):
            raise SynthesisError(f"voices.{name} must be {{audio: <file>, text: <what it says>}}")
        unknown = sorted(set(map(str, entry)) - set(VOICE_KEYS))
        if unknown:
            raise SynthesisError(f"voices.{name}: unknown key {unknown[0]!r} (use {', '.join(VOICE_KEYS)})")
        speaker = entry.get("speaker")
        out[name] = Voice(name, i if speaker is None else speaker, _clips(name, entry, max_seconds))
    return out


def _clips(name: str, entry: Mapping, max_seconds: float | None) -> list[tuple[str, str, np.ndarray]]:
    try:
        return check_references(entry.get("audio"), entry.get("text"), max_seconds)
    except SynthesisError as err:
        raise SynthesisError(f"voices.{name}: {err}") from err


def _folder_voices(folder: Path, max_seconds: float | None) -> dict[str, Voice]:
    if not folder.is_dir():
        raise SynthesisError(
            f"voices={folder} is not a folder (or give voices={{name: {{audio: ..., text: ...}}}})"
        )
    clips = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES}
    stored = {p.stem for p in folder.glob("*.json") if is_stored(folder, p.stem)}
    out = {}
    for i, name in enumerate(sorted(clips.keys() | stored)):
        if name not in clips:
            voice = read_stored(folder, name)  # the server's stored voice (a one-line error when unreadable)
            out[name] = Voice(name, i, stored=voice)
            continue
        transcript = clips[name].with_suffix(".txt")
        if not transcript.is_file():
            raise SynthesisError(f"voice {clips[name]} has no transcript {transcript.name} next to it")
        try:
            entry = {"audio": str(clips[name]), "text": transcript.read_text(encoding="utf-8").strip()}
            out[name] = Voice(name, i, _clips(name, entry, max_seconds))
        except SynthesisError:
            raise
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise SynthesisError(f"cannot read voice {name!r} in {folder}: {one_line(err)}") from err
    if not out:
        raise SynthesisError(f"voices={folder} holds no voices (<name>.wav + <name>.txt, or the server's)")
    return out


def resolve_voices(scripts: list[Script], voices: dict[str, Voice], speakers: dict[str, int]) -> None:
    """Every voice's and every turn's speaker as a prompt id, checked against the model's speakers
    (``speakers``: name -> id) before the codec loads; errors name the voice or the script line."""
    for voice in voices.values():
        try:
            voice.speaker = resolve_speaker(voice.speaker, speakers)
        except SynthesisError as err:
            raise SynthesisError(f"voices.{voice.name}: {err}; set voices.{voice.name}.speaker") from err
    for script in scripts:
        for turn in script.turns:
            if turn.speaker in voices:
                continue
            try:
                resolve_speaker(turn.speaker, speakers)
            except SynthesisError as err:
                known = f"voices: {', '.join(voices)}; " if voices else "no voices= given; "
                raise SynthesisError(
                    f"{script.source} line {turn.line}: unknown speaker {turn.speaker!r} ({known}{err})"
                ) from err


def encode_voices(voices: dict[str, Voice], codec: Any, max_seconds: float | None = 30.0) -> None:
    """Encode every voice's clips into its prompt segments (once; each turn reuses them)."""
    for voice in voices.values():
        if voice.stored is not None:
            stored = voice.stored
            if stored.codec != str(codec.identity):
                raise SynthesisError(
                    f"voice {voice.name!r} was encoded with codec {stored.codec}, not {codec.identity}"
                )
            voice.prompt = [Segment(stored.text, voice.speaker, stored.codes)]
            continue
        paths, texts = [c[0] for c in voice.clips], [c[1] for c in voice.clips]
        voice.prompt = load_references(paths, texts, voice.speaker, codec, max_seconds, voice.clips)


# ---- generation ---------------------------------------------------------------------------------


@dataclass
class TurnResult:
    """A generated turn and its place in the conversation (seconds from the start of the joined wav)."""

    turn: int  # 1-based
    line: int
    speaker: str
    speaker_id: int | str
    text: str
    audio: Tensor  # [N] float32
    codes: Tensor  # [32, frames]
    eos: bool
    start: float
    end: float
    context: list[int]  # the turns (numbers) in its prompt, oldest first
    dropped: int  # earlier turns left out for room (not counting context_turns)
    prompt_rows: int  # rows of its first piece's prompt
    seed: int

    def timeline(self) -> dict[str, Any]:
        """The JSON timeline entry (no audio or codes)."""
        return {
            "turn": self.turn, "line": self.line, "speaker": self.speaker, "speaker_id": self.speaker_id,
            "text": self.text, "start": round(self.start, 4), "end": round(self.end, 4),
            "frames": int(self.codes.shape[1]), "eos": self.eos, "context": self.context,
            "dropped": self.dropped, "prompt_rows": self.prompt_rows, "seed": self.seed,
        }  # fmt: skip


@dataclass
class Conversation:
    """One script's generated turns."""

    script: Script
    turns: list[TurnResult] = field(default_factory=list)
    history: list[tuple[int, Segment]] = field(default_factory=list)  # (turn number, segment) with audio
    length: int = 0  # samples of the joined wav so far
    tail: Tensor = field(default_factory=lambda: torch.zeros(0))  # its end, held back to mix the next turn in

    def audio(self, sample_rate: int) -> Tensor:
        """The whole conversation [n]: every turn at its start (silence between, overlaps summed)."""
        out = torch.zeros(self.length)
        for t in self.turns:
            start = round(t.start * sample_rate)
            out[start : start + t.audio.numel()] += t.audio
        return out


@dataclass
class Plan:
    """Turn k of one conversation: its request, speaker and the history turns in its context."""

    conv: int
    turn: Turn
    speaker: int | str
    voices: list[Segment]
    kept: list[tuple[int, Segment]]
    dropped: int
    text_rows: list[int]  # per piece
    limits: list[int]  # frame limit per piece
    seed: int

    def context(self) -> list[Segment]:
        return self.voices + [seg for _, seg in self.kept]


def converse(synth: Synthesizer, scripts: list[Script], voices: dict[str, Voice] | None = None,
             context_turns: int | None = None, stream: bool = False, on_audio: OnAudio | None = None,
             on_turn: Callable[[int, TurnResult], None] | None = None,
             overlap_ms: float = 0.0, generate: Generate | None = None) -> list[Conversation]:  # fmt: skip
    """Generate every script as a conversation (``settings.batch_size`` conversations per batch).

    ``on_audio(c, audio)`` receives conversation c's joined wav in order: turn by turn, or chunk by
    chunk as it is decoded with ``stream``. Turns are joined by ``settings.pause_ms`` of silence, or
    each starts ``overlap_ms`` before the previous one ends (summed; not with ``stream``).
    ``on_turn(c, turn)`` follows each turn. ``generate(requests, on_chunk)`` makes each round's audio
    (default ``synth.synthesize``; the server passes its model worker): ``synth`` then only plans the
    prompts (its tokenizer, settings, speakers and ``max_len``).
    """
    voices = voices or {}
    s = synth.settings
    sr = synth.sample_rate
    if overlap_ms and stream:
        raise SynthesisError(
            "overlap_ms needs stream=false (streamed audio is written before the next turn exists)"
        )
    pause = torch.zeros(round(s.pause_ms / 1000 * sr))
    overlap = round(overlap_ms / 1000 * sr)

    def emit(c: int, audio: Tensor) -> None:
        if on_audio is not None and audio.numel():
            on_audio(c, audio)

    convs = [Conversation(script) for script in scripts]
    rows = RowCounter(synth)
    bs = max(1, int(s.batch_size))
    for k in range(max(len(script.turns) for script in scripts)):
        active = [c for c, script in enumerate(scripts) if k < len(script.turns)]
        for g in range(0, len(active), bs):
            plans = [_plan(synth, rows, convs[c], c, k, voices, context_turns) for c in active[g : g + bs]]
            _fit_batch(synth, rows, plans)
            for p in plans:
                _log_context(convs[p.conv].script, k, p, synth.max_len)
            _round(synth, rows, convs, plans, (pause, overlap), stream, emit, on_turn, generate)
    for c, conv in enumerate(convs):
        emit(c, conv.tail)
        conv.tail = torch.zeros(0)
    return convs


def _round(synth: Synthesizer, rows: RowCounter, convs: list[Conversation], plans: list[Plan], gap: tuple[Tensor, int],
           stream: bool, emit: OnAudio, on_turn: Callable[[int, TurnResult], None] | None,
           generate: Generate | None = None) -> None:  # fmt: skip
    sr = synth.sample_rate
    requests = [Request(p.turn.text, p.speaker, p.seed, context=p.context()) for p in plans]
    if stream:
        for p in plans:
            if convs[p.conv].turns:
                emit(p.conv, gap[0])

    def chunk(i: int, audio: Tensor) -> None:
        emit(plans[i].conv, audio)

    results = (generate or synth.synthesize)(requests, chunk if stream else None)
    for p, res in zip(plans, results, strict=True):
        conv = convs[p.conv]
        if stream:
            first = conv.length + (gap[0].numel() if conv.turns else 0)
            conv.length = first + res.audio.numel()
        else:
            first = _join(conv, res.audio, gap, partial(emit, p.conv))
        start = first / sr
        turn = TurnResult(
            turn=len(conv.turns) + 1, line=p.turn.line, speaker=p.turn.speaker, speaker_id=p.speaker,
            text=p.turn.text, audio=res.audio, codes=res.codes, eos=all(res.eos), start=start,
            end=start + res.audio.numel() / sr, context=[n for n, _ in p.kept], dropped=p.dropped,
            prompt_rows=rows(p.context()) + p.text_rows[0], seed=p.seed,
        )  # fmt: skip
        conv.turns.append(turn)
        if res.codes.shape[1] > 0:
            conv.history.append((turn.turn, Segment(p.turn.text, p.speaker, res.codes)))
        if on_turn is not None:
            on_turn(p.conv, turn)


def _join(conv: Conversation, audio: Tensor, gap: tuple[Tensor, int], emit: Callable[[Tensor], None]) -> int:
    """Place a turn in the joined wav, after ``gap = (pause, overlap)``'s pause or ``overlap`` samples
    over the previous turn's end (summed); hand out all but the last ``overlap`` samples (the next
    turn is mixed into them). Returns the turn's start sample."""
    pause, overlap = gap
    if not conv.turns:
        start, pending = 0, audio
    elif overlap:
        n = min(conv.tail.numel(), audio.numel())
        cut = conv.tail.numel() - n
        start, pending = conv.length - n, torch.cat([conv.tail[:cut], conv.tail[cut:] + audio[:n], audio[n:]])
    else:
        start, pending = conv.length + pause.numel(), torch.cat([conv.tail, pause, audio])
    conv.length = max(conv.length, start + audio.numel())
    keep = pending.numel() - min(overlap, pending.numel())
    emit(pending[:keep])
    conv.tail = pending[keep:]
    return start


def _plan(synth: Synthesizer, rows: RowCounter, conv: Conversation, c: int, k: int, voices: dict[str, Voice],
          context_turns: int | None) -> Plan:  # fmt: skip
    """Turn k's context: the speakers' voice prompts and as many of the latest turns as fit."""
    s, turn = synth.settings, conv.script.turns[k]
    voice = voices.get(turn.speaker)
    speaker = resolve_speaker(turn.speaker if voice is None else voice.speaker, synth.speakers)
    names = dict.fromkeys(t.speaker for t in conv.script.turns)  # speakers in order of appearance
    prompts = [seg for name in names if name in voices for seg in voices[name].prompt]
    pieces = synth.pieces(Request(turn.text))
    limits = [max_frames(p, s.max_audio_seconds, s.bound) for p in pieces]
    text_rows = [len(encode_prompt(rows.tokenizer, p, speaker)) for p in pieces]
    need = max(r + n for r, n in zip(text_rows, limits, strict=True))
    fixed = rows(prompts) + need
    if fixed > synth.max_len:
        raise SynthesisError(
            f"{conv.script.source} line {turn.line}: the voice prompts and this turn need {fixed} of the "
            f"model's {synth.max_len} positions; use shorter voice clips or split the turn"
        )
    latest = len(conv.history) if context_turns is None else context_turns
    history = conv.history[max(0, len(conv.history) - latest) :]
    kept = list(history)
    while kept and fixed + rows([seg for _, seg in kept]) > synth.max_len:
        kept.pop(0)
    seed = int(s.seed) + SEED_STRIDE * c + k + 1
    return Plan(c, turn, speaker, prompts, kept, len(history) - len(kept), text_rows, limits, seed)


def _fit_batch(synth: Synthesizer, count: RowCounter, plans: list[Plan]) -> None:
    """Prompts of a batch are left-padded to the longest: drop old turns of the longest prompts until
    the batch's longest frame limit still fits after them (a conversation alone never needs this)."""
    if len(plans) < 2:
        return
    while True:
        rows = [count(p.context()) + max(p.text_rows) for p in plans]
        if max(rows) + max(max(p.limits) for p in plans) <= synth.max_len:
            return
        longest = max((i for i, p in enumerate(plans) if p.kept), key=lambda i: rows[i], default=None)
        if longest is None:
            return  # only voice prompts left: the engine cuts frames at the room there is
        plans[longest].kept.pop(0)
        plans[longest].dropped += 1


class RowCounter:
    """Prompt rows of context segments (text rows, audio rows and the EOS row each), each segment
    tokenized once per ``converse`` call: planning asks about the same history turns again and again."""

    def __init__(self, synth: Synthesizer):
        self.tokenizer = _tokenizer(synth)
        self.known: dict[
            int, tuple[Segment, int]
        ] = {}  # id -> (the segment, kept alive: ids stay unique; rows)

    def __call__(self, segments: list[Segment]) -> int:
        total = 0
        for seg in segments:
            hit = self.known.get(id(seg))
            if hit is None:
                n = len(encode_prompt(self.tokenizer, seg.text, seg.speaker)) + int(seg.codes.shape[1]) + 1
                hit = self.known[id(seg)] = (seg, n)
            total += hit[1]
        return total


def _tokenizer(synth: Synthesizer) -> Tokenizer:
    if synth.tokenizer is None:
        raise SynthesisError("a conversation needs the model's tokenizer (this Synthesizer has none)")
    return synth.tokenizer


def _log_context(script: Script, k: int, plan: Plan, max_len: int) -> None:
    if plan.dropped:
        log.info("%s turn %d (line %d): %d oldest turn(s) left out of the context to fit the model's %d "
                 "positions; it sees turns %s", script.name, k + 1, plan.turn.line, plan.dropped, max_len,
                 ", ".join(map(str, [n for n, _ in plan.kept])) or "none")  # fmt: skip


def timeline(script: Script, turns: list[TurnResult], sample_rate: int, pause_ms: float,
             wavs: list[str] | None = None, overlap_ms: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """The JSON timeline of a conversation's turns so far (start/end: seconds in the joined wav)."""
    entries = [t.timeline() for t in turns]
    for entry, wav in zip(entries, wavs or [], strict=False):
        entry["wav"] = wav
    return {
        "script": script.source, "sample_rate": sample_rate, "pause_ms": 0.0 if overlap_ms else pause_ms,
        "overlap_ms": overlap_ms,
        "seconds": round(max((t.end for t in turns), default=0.0), 4),
        "frames": sum(int(t.codes.shape[1]) for t in turns), "turns": entries,
    }  # fmt: skip
