"""``python synthesize.py ckpt=... text=...``: text (or a file of lines) to 24 kHz wav files.

``run(cfg)`` checks every input and output path first (a typo fails in a second, not after loading a
model), loads the engine (``elise.synthesis.Synthesizer``), writes what it returns through
``elise.data.audio`` and returns one metrics dict per utterance (also logged as one line each, and
written to ``metrics_out``). Nothing is written in the working directory when ``output=`` or
``output_dir=`` is given; otherwise the wavs and a ``synthesize.log`` go to a new ``outputs/synth/<time>``.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from elise.config import to_dict
from elise.data.audio import WavWriter, write_wav
from elise.synthesis.dialogue import (
    Script,
    TurnResult,
    converse,
    encode_voices,
    read_scripts,
    read_voices,
    resolve_voices,
    timeline,
)
from elise.synthesis.engine import Request, Result, Settings, Synthesizer, resolve_speaker
from elise.synthesis.errors import SynthesisError, one_line
from elise.synthesis.inputs import check_writable, collect_texts, default_output_dir, output_paths
from elise.synthesis.prompt import check_references
from elise.synthesis.runtime import load, load_codec, prepare_model, resolve_device, resolve_dtype
from elise.synthesis.text import LengthBound

log = logging.getLogger("elise.synthesize")


def _number(cfg: DictConfig, key: str, kind: type, minimum: float | None = None, above: bool = False) -> Any:
    value = cfg[key]
    if value is None:
        return None
    try:
        value = kind(value)
    except (TypeError, ValueError) as err:
        raise SynthesisError(f"{key}={value!r} is not a {kind.__name__}") from err
    if minimum is not None and (value <= minimum if above else value < minimum):
        raise SynthesisError(f"{key}={value} must be {'>' if above else '>='} {minimum}")
    return value


def settings_from(cfg: DictConfig) -> Settings:
    seed = _number(cfg, "seed", int)
    length = cfg.length
    bound = LengthBound(float(length.seconds_per_char), float(length.margin), float(length.extra_seconds),
                        float(length.min_seconds_per_char))  # fmt: skip
    return Settings(
        speaker=cfg.speaker,
        temperature=_number(cfg, "temperature", float, 0.0),
        top_k=_number(cfg, "top_k", int, 0),
        depth_temperature=_number(cfg, "depth_temperature", float, 0.0),
        seed=secrets.randbelow(2**31) if seed is None else seed,
        max_audio_seconds=_number(cfg, "max_audio_seconds", float, 0.0, above=True),
        bound=bound,
        split_sentences=bool(cfg.split_sentences),
        max_sentence_chars=_number(cfg, "max_sentence_chars", int, 1),
        min_sentence_chars=_number(cfg, "min_sentence_chars", int, 0),
        pause_ms=_number(cfg, "pause_ms", float, 0.0),
        carry_context=bool(cfg.carry_context),
        batch_size=_number(cfg, "batch_size", int, 1),
        stream_chunk_frames=_number(cfg, "stream_chunk_frames", int, 1),
    )


def _typed(cfg: DictConfig, key: str) -> Any:
    """A free-text value as typed: OmegaConf reads a text of ``???`` as a missing value."""
    return "???" if OmegaConf.is_missing(cfg, key) else cfg[key]


def _summary(path: Path, m: dict[str, Any]) -> str:
    line = f"{path.name}: {m['audio_seconds']:.2f} s audio in {m['generation_seconds']:.2f} s"
    if m["rtf"] is not None:
        line += f" (RTF {m['rtf']:.3f}, {m['frames_per_second']:.1f} frames/s)"
    if m["batch_size"] > 1:
        line += f", batch of {m['batch_size']}"
    if m["first_chunk_seconds"] is not None:
        line += f", first chunk after {m['first_chunk_seconds']:.3f} s"
    return line + ("" if m["eos"] else ", CUT at the length limit (no end-of-speech)")


def _log_to(folder: Path) -> None:
    """Also log into ``folder/synthesize.log`` (the default output folder only)."""
    handler = logging.FileHandler(folder / "synthesize.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)


def _load(
    cfg: DictConfig, settings: Settings, check: Callable[[dict[str, int]], object]
) -> tuple[Synthesizer, float]:
    """The engine for ``cfg`` and its loading time; ``check(speakers)`` runs before the codec loads."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    t0 = time.perf_counter()
    loaded = load(cfg.ckpt, device, cfg.get("base"))
    check(loaded.speakers)  # an unknown speaker fails before the codec loads
    model = prepare_model(loaded.model, dtype, cfg.quantize, bool(cfg.compile))
    codec_node = cfg.get("codec")  # absent when no codec= is given: the checkpoint's own
    codec_cfg = to_dict(codec_node) if isinstance(codec_node, DictConfig) else codec_node
    codec = load_codec(codec_cfg, loaded.codec, device, model.cfg.num_codebooks)
    load_seconds = time.perf_counter() - t0
    log.info("loaded %s (%s) and codec %s in %.2f s on %s", cfg.ckpt, loaded.source, codec.identity,
             load_seconds, device)  # fmt: skip
    if codec.random_weights:
        log.warning("codec %s has RANDOM weights: the audio it decodes is noise, not speech", codec.identity)
    return Synthesizer(model, loaded.tokenizer, codec, settings, loaded.speakers), load_seconds


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Synthesize every utterance of ``cfg``; returns one metrics dict per utterance, in order
    (a ``dialogue``/``dialogue_file`` run: one dict per turn, ``run_dialogue``)."""
    if _typed(cfg, "dialogue") is not None or cfg.dialogue_file:
        return run_dialogue(cfg)
    texts = collect_texts(_typed(cfg, "text"), cfg.text_file)
    settings = settings_from(cfg)
    paths = output_paths(len(texts), cfg.output, cfg.output_dir, bool(cfg.get("overwrite", False)))
    if cfg.metrics_out:
        check_writable(Path(str(cfg.metrics_out)))
    clips = check_references(  # read and checked before any model loads; encoded once the codec is there
        cfg.reference_audio, cfg.reference_text, _number(cfg, "reference_max_seconds", float, 0.0)
    )
    if cfg.threads:
        torch.set_num_threads(_number(cfg, "threads", int, 1))
    if not cfg.output and not cfg.output_dir:
        _log_to(paths[0].parent)  # the new outputs/synth/<time> (claimed by output_paths)
    synth, load_seconds = _load(cfg, settings, lambda speakers: resolve_speaker(settings.speaker, speakers))
    synth.set_voice(cfg.reference_audio, cfg.reference_text, cfg.reference_max_seconds, clips)
    if synth.context:
        log.info("voice prompt: %d clip(s), %d frames", len(synth.context),
                 sum(s.codes.shape[1] for s in synth.context))  # fmt: skip
    log.info("seed %d, %d utterance(s)", settings.seed, len(texts))

    t1 = time.perf_counter()
    results = _generate(synth, [Request(t) for t in texts], paths, bool(cfg.stream))
    wall = time.perf_counter() - t1
    metrics = []
    for i, (text, path, result) in enumerate(zip(texts, paths, results, strict=True)):
        m = {"index": i + 1, "path": str(path), "text": text, **result.metrics}
        m["model_load_seconds"] = round(load_seconds, 4)
        if cfg.save_codes:
            codes_path = path.with_suffix(".codes.npy")
            np.save(codes_path, result.codes.numpy().astype(np.int64))  # [32, frames]
            m["codes_path"] = str(codes_path)
        log.info(_summary(path, m))
        metrics.append(m)
    if cfg.metrics_out:
        _write_json(Path(str(cfg.metrics_out)), metrics)
    audio = sum(m["audio_seconds"] for m in metrics)
    rtf = f"RTF {wall / audio:.3f}" if audio > 0 else "no audio"
    log.info("done: %d file(s), %.2f s of audio in %.2f s (%s), in %s", len(metrics), audio, wall, rtf,
             paths[0].parent)  # fmt: skip
    return metrics


def run_dialogue(cfg: DictConfig) -> list[dict[str, Any]]:
    """Generate the conversation(s) of ``dialogue``/``dialogue_file`` (``elise.synthesis.dialogue``) into
    ``output_dir``: ``conversation.wav`` (turns joined with ``pause_ms``), ``turns/NNN_<speaker>.wav`` (and
    its text as ``.txt``: ``python -m elise.evaluate audio=<dir>/turns`` scores them) and ``timeline.json``
    (rewritten after every turn); a folder of scripts gets one such folder per script.
    Returns one dict per turn (its timeline entry, ``conversation`` and ``path`` added)."""
    if _typed(cfg, "text") is not None or cfg.text_file:
        raise SynthesisError("pass text/text_file or dialogue/dialogue_file, not both")
    if cfg.output:
        raise SynthesisError(
            "a conversation is written to a folder (wavs and timeline.json): use output_dir="
        )
    if cfg.reference_audio or _typed(cfg, "reference_text") is not None:
        raise SynthesisError(
            "reference_audio is for text=; give the speakers voices={name: {audio: ..., text: ...}}"
        )
    scripts = read_scripts(_typed(cfg, "dialogue"), cfg.dialogue_file)
    settings = settings_from(cfg)
    context_turns = _number(cfg, "context_turns", int, 0)
    overlap_ms = _number(cfg, "overlap_ms", float, 0.0)
    max_seconds = _number(cfg, "reference_max_seconds", float, 0.0)
    node = cfg.voices
    voices = read_voices(to_dict(node) if isinstance(node, DictConfig) else node, max_seconds)
    folders = _dialogue_folders(scripts, cfg.output_dir, bool(cfg.overwrite))
    if cfg.metrics_out:
        check_writable(Path(str(cfg.metrics_out)))
    if cfg.threads:
        torch.set_num_threads(_number(cfg, "threads", int, 1))
    if not cfg.output_dir:
        _log_to(folders[0] if len(folders) == 1 else folders[0].parent)
    synth, load_seconds = _load(cfg, settings, lambda speakers: resolve_voices(scripts, voices, speakers))
    encode_voices(voices, synth.codec, max_seconds)
    log.info("seed %d, %d conversation(s), %d turn(s), voices: %s", settings.seed, len(scripts),
             sum(len(s.turns) for s in scripts), ", ".join(voices) or "none")  # fmt: skip

    writers: dict[int, WavWriter] = {}
    wavs: list[list[str]] = [[] for _ in scripts]
    rows: list[dict[str, Any]] = []
    done: list[list[TurnResult]] = [[] for _ in scripts]

    def on_audio(c: int, audio: torch.Tensor) -> None:
        if c not in writers:
            writers[c] = WavWriter(folders[c] / "conversation.wav", synth.sample_rate)
        writers[c].append(audio.numpy())

    def on_turn(c: int, turn: TurnResult) -> None:
        name = f"{turn.turn:03d}_{re.sub(r'[^A-Za-z0-9_-]+', '-', turn.speaker)}"
        path = folders[c] / "turns" / f"{name}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_wav(path, turn.audio.numpy(), synth.sample_rate)
        path.with_suffix(".txt").write_text(
            turn.text + "\n", encoding="utf-8"
        )  # elise.evaluate audio=<turns>
        if cfg.save_codes:
            np.save(path.with_suffix(".codes.npy"), turn.codes.numpy().astype(np.int64))  # [32, frames]
        wavs[c].append(str(path.relative_to(folders[c])))
        done[c].append(turn)
        line = timeline(scripts[c], done[c], synth.sample_rate, settings.pause_ms, wavs[c], overlap_ms)
        _write_json(folders[c] / "timeline.json", line)
        rows.append({"conversation": scripts[c].name, "path": str(path), **turn.timeline()})
        log.info("%s turn %d/%d (%s): %.2f s%s", scripts[c].name, turn.turn, len(scripts[c].turns),
                 turn.speaker, turn.end - turn.start, "" if turn.eos else ", CUT at the length limit")  # fmt: skip

    t1 = time.perf_counter()
    try:
        try:
            convs = converse(
                synth, scripts, voices, context_turns, bool(cfg.stream), on_audio, on_turn, overlap_ms
            )
        finally:
            for w in writers.values():
                w.close()
        for c, folder in enumerate(folders):
            if c not in writers:  # no audio at all: still a (empty) valid wav
                WavWriter(folder / "conversation.wav", synth.sample_rate).close()
    except OSError as err:
        raise SynthesisError(f"cannot write output: {one_line(err)}") from err
    wall = time.perf_counter() - t1
    for row in rows:
        row["model_load_seconds"] = round(load_seconds, 4)
    if cfg.metrics_out:
        _write_json(Path(str(cfg.metrics_out)), rows)
    for conv, folder in zip(convs, folders, strict=True):
        seconds = conv.length / synth.sample_rate
        log.info("%s: %d turns, %.2f s of audio -> %s", conv.script.name, len(conv.turns), seconds,
                 folder / "conversation.wav")  # fmt: skip
    log.info("done: %d conversation(s) in %.2f s", len(convs), wall)
    return rows


def _dialogue_folders(scripts: list[Script], output_dir: object, overwrite: bool) -> list[Path]:
    """The folder of each conversation (``output_dir``, or one subfolder per script of a folder), checked
    writable and free (``overwrite``) before any model loads."""
    root = Path(str(output_dir)).expanduser() if output_dir else default_output_dir()
    if root.exists() and not root.is_dir():
        raise SynthesisError(f"output_dir={root} exists and is not a directory")
    folders = [root] if len(scripts) == 1 else [root / s.name for s in scripts]
    for folder in folders:
        for name in ("conversation.wav", "timeline.json", "turns"):
            if (folder / name).exists() and not overwrite:
                raise SynthesisError(f"{folder / name} exists; pass overwrite=true to replace it")
        check_writable(folder / "conversation.wav")
    return folders


def _generate(synth: Synthesizer, requests: list[Request], paths: list[Path], stream: bool) -> list[Result]:
    """Run the engine; write each wav at the end, or chunk by chunk while it is made (``stream``)."""
    try:
        if not stream:
            results = synth.synthesize(requests)
            for path, result in zip(paths, results, strict=True):
                write_wav(path, result.audio.numpy(), result.sample_rate)
            return results
        writers: dict[int, WavWriter] = {}
        try:

            def write(i: int, chunk: torch.Tensor) -> None:
                if i not in writers:
                    writers[i] = WavWriter(paths[i], synth.sample_rate)
                writers[i].append(chunk.numpy())

            results = synth.synthesize(requests, on_chunk=write)
        finally:
            for w in writers.values():
                w.close()
        for i, path in enumerate(paths):
            if i not in writers:  # no audio at all: still a (empty) valid wav
                WavWriter(path, synth.sample_rate).close()
        return results
    except OSError as err:
        raise SynthesisError(f"cannot write output: {one_line(err)}") from err


def _write_json(path: Path, metrics: list[dict[str, Any]] | dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        raise SynthesisError(f"cannot write metrics_out {path}: {one_line(err)}") from err


def main(cfg: DictConfig) -> None:
    """``python synthesize.py``'s body: ``run``, a user error as one line and exit code 2."""
    from elise.checkpoints import CheckpointError
    from elise.codec import CodecUnavailable
    from elise.errors import exit_with

    try:
        run(cfg)
    except (SynthesisError, CheckpointError, CodecUnavailable, OSError) as err:
        exit_with(err)
