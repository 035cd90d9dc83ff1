"""Dialogue mode: ``python -m elise.evaluate ckpt=... dialogue_file=<script or folder>`` (or ``dialogue=``).

Each conversation is generated as ``synthesize.py dialogue=...`` generates it
(``elise.synthesis.dialogue.converse``: every turn prompted with the voices and the earlier turns), its
files kept under ``out/<script name>/`` (``conversation.wav``, ``timeline.json``, ``turns/NNN_<speaker>.wav``
+ ``.txt``), then every turn is scored against its text with the same metrics as the evaluation set; the
report's items carry ``conversation`` and ``turn``, and ``conversations`` holds each timeline.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from elise.data.audio import resample, write_wav
from elise.evaluate.report import write_report
from elise.evaluate.score import Scorer
from elise.evaluate.sources import RATE, Item
from elise.evaluate.synth import default_scorer, load_synthesizer, run_record, settings_of
from elise.synthesis.dialogue import (
    Script,
    TurnResult,
    Voice,
    converse,
    encode_voices,
    read_voices,
    resolve_voices,
    timeline,
)
from elise.synthesis.engine import OnChunk, Request, Result


def evaluate_dialogue(
    ckpt: str,
    scripts: Sequence[Script],
    out: str | Path,
    voices: object = None,
    speaker_ref: Sequence[str] | None = None,
    *,
    codec: dict[str, Any] | str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    base: str | None = None,
    context_turns: int | None = None,
    metrics: Sequence[str] | None = None,
    asr: str = "auto",
    sim: str = "auto",
    mos: str = "auto",
    reference_max_seconds: float = 30.0,
    scorer: Scorer | None = None,
    **synth_settings: Any,
) -> dict[str, Any]:
    """Generate ``scripts`` (``elise.synthesis.dialogue.parse_script``/``read_scripts``) with ``ckpt``, score
    every turn, write the reports in ``out``; returns the eval_report dict. ``voices``: as
    ``synthesize.py``'s ``voices=`` (``{name: {audio, text, speaker}}`` or a folder); a turn spoken by a
    voice with clips is SIM-scored against its first clip (else against ``speaker_ref``).
    ``synth_settings``: ``Settings`` fields (seed, temperature, top_k, pause_ms, batch_size, ...)."""
    out = Path(out)
    names = [s.name for s in scripts]
    if len(set(names)) != len(names):
        raise ValueError(f"two conversations share a name ({', '.join(names)}): rename the scripts")
    by_name = read_voices(voices, reference_max_seconds)
    scorer = default_scorer(scorer, metrics, asr, None, sim, None, mos, device)
    settings = settings_of(synth_settings)
    synth, load_seconds = load_synthesizer(ckpt, codec, device, dtype, settings, base)
    t0 = time.perf_counter()
    resolve_voices(list(scripts), by_name, synth.speakers)
    encode_voices(by_name, synth.codec, reference_max_seconds)
    load_seconds += time.perf_counter() - t0
    sr = synth.sample_rate

    rtfs: list[float | None] = []  # each result's real-time factor, in the order converse hands out turns

    def generate(requests: list[Request], on_chunk: OnChunk | None) -> list[Result]:
        results = synth.synthesize(requests, on_chunk)
        rtfs.extend(r.metrics["rtf"] for r in results)
        return results

    items: list[Item] = []
    wavs: list[list[str]] = [[] for _ in scripts]

    def on_turn(c: int, turn: TurnResult) -> None:
        name = scripts[c].name
        path = out / name / "turns" / f"{turn.turn:03d}_{re.sub(r'[^A-Za-z0-9_-]+', '-', turn.speaker)}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        audio = turn.audio.numpy()
        write_wav(path, audio, sr)
        path.with_suffix(".txt").write_text(turn.text + "\n", encoding="utf-8")
        wavs[c].append(str(path.relative_to(out / name)))
        voice = by_name.get(turn.speaker)
        items.append(Item(f"{name}/{turn.turn:03d}", turn.text, str(path), audio if sr == RATE else resample(audio, sr, RATE),
                          kind="turn", reference=_reference(voice), eos=turn.eos, rtf=rtfs.pop(0),
                          conversation=name, turn=turn.turn))  # fmt: skip

    t1 = time.perf_counter()
    convs = converse(synth, list(scripts), by_name, context_turns, on_turn=on_turn, generate=generate)
    synth_seconds = time.perf_counter() - t1
    timelines = {}
    for c, conv in enumerate(convs):
        folder = out / conv.script.name
        write_wav(folder / "conversation.wav", conv.audio(sr).numpy(), sr)
        timelines[conv.script.name] = timeline(conv.script, conv.turns, sr, settings.pause_ms, wavs[c])
        (folder / "timeline.json").write_text(
            json.dumps(timelines[conv.script.name], indent=2) + "\n", "utf-8"
        )
    t2 = time.perf_counter()
    report = scorer.score(items, speaker_ref)
    report["conversations"] = timelines
    seconds = {"load": load_seconds, "synthesis": synth_seconds, "scoring": time.perf_counter() - t2}
    report["run"] = run_record(ckpt, synth, settings, seconds, dialogue=[s.source for s in scripts],
                               voices=sorted(by_name), context_turns=context_turns)  # fmt: skip
    write_report(report, out)
    return report


def _reference(voice: Voice | None) -> str | None:
    """The clip a voice's turns should sound like (its first reference clip; none for a server voice)."""
    return voice.clips[0][0] if voice is not None and voice.clips else None
