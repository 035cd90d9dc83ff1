"""``python synthesize.py ckpt=... text=...``: text (or a file of lines) to 24 kHz wav files.

``run(cfg)`` checks the inputs and output paths first (a typo fails in a second, not after loading a
model), loads the checkpoint and codec, encodes the voice prompt, generates in batches and returns
one metrics dict per utterance (also logged as one line each, and written to ``metrics_out``).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from elise.config import to_dict
from elise.synthesis.engine import Result, Settings, Synthesizer
from elise.synthesis.errors import SynthesisError, one_line
from elise.synthesis.inputs import collect_texts, output_paths
from elise.synthesis.prompt import load_references
from elise.synthesis.runtime import load, load_codec, prepare_model, resolve_device, resolve_dtype
from elise.synthesis.text import LengthBound
from elise.synthesis.wav import check_writable

log = logging.getLogger("elise.synthesize")


def _number(cfg: DictConfig, key: str, kind: type, minimum: float | None = None) -> Any:
    value = cfg[key]
    if value is None:
        return None
    try:
        value = kind(value)
    except (TypeError, ValueError) as err:
        raise SynthesisError(f"{key}={value!r} is not a {kind.__name__}") from err
    if minimum is not None and value < minimum:
        raise SynthesisError(f"{key}={value} must be >= {minimum}")
    return value


def settings_from(cfg: DictConfig) -> Settings:
    seed = _number(cfg, "seed", int)
    length = cfg.length
    return Settings(
        speaker=cfg.speaker,
        temperature=_number(cfg, "temperature", float, 0.0),
        top_k=_number(cfg, "top_k", int, 0),
        seed=secrets.randbelow(2**31) if seed is None else seed,
        max_audio_seconds=_number(cfg, "max_audio_seconds", float),
        bound=LengthBound(float(length.seconds_per_char), float(length.margin), float(length.extra_seconds)),
        split_sentences=bool(cfg.split_sentences),
        max_sentence_chars=_number(cfg, "max_sentence_chars", int, 1),
        min_sentence_chars=_number(cfg, "min_sentence_chars", int, 0),
        pause_ms=_number(cfg, "pause_ms", float, 0.0),
        carry_context=bool(cfg.carry_context),
        stream=bool(cfg.stream),
        stream_chunk_frames=_number(cfg, "stream_chunk_frames", int, 1),
    )


def _hydra_run_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


def metrics_of(
    result: Result, load_seconds: float, seed: int, stream: bool, sample_rate: int
) -> dict[str, Any]:
    audio = result.num_samples / sample_rate
    gen = result.generation_seconds
    return {
        "index": result.job.index,
        "path": str(result.job.path),
        "text": result.job.text,
        "pieces": len(result.job.pieces),
        "frames": result.frames,
        "audio_seconds": round(audio, 4),
        "generation_seconds": round(gen, 4),
        "rtf": round(gen / audio, 4) if audio > 0 else None,
        "frames_per_second": round(result.frames / gen, 2) if gen > 0 else None,
        "first_chunk_seconds": round(result.first_chunk_seconds, 4)
        if stream and result.first_chunk_seconds is not None
        else None,
        "model_load_seconds": round(load_seconds, 4),
        "eos": all(result.eos),
        "batch_size": result.batch_size,
        "seed": seed,
    }


def _summary(m: dict[str, Any]) -> str:
    line = f"{Path(m['path']).name}: {m['audio_seconds']:.2f} s audio in {m['generation_seconds']:.2f} s"
    if m["rtf"] is not None:
        line += f" (RTF {m['rtf']:.3f}, {m['frames_per_second']:.1f} frames/s)"
    if m["batch_size"] > 1:
        line += f", batch of {m['batch_size']}"
    if m["first_chunk_seconds"] is not None:
        line += f", first chunk after {m['first_chunk_seconds']:.3f} s"
    return line + ("" if m["eos"] else ", CUT at the length limit (no end-of-speech)")


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Synthesize every utterance of ``cfg``; returns one metrics dict per utterance, in order."""
    texts = collect_texts(cfg.text, cfg.text_file)
    paths = output_paths(len(texts), cfg.output, cfg.output_dir, _hydra_run_dir())
    if cfg.metrics_out:
        check_writable(Path(str(cfg.metrics_out)))
    settings = settings_from(cfg)
    batch_size = _number(cfg, "batch_size", int, 1)
    if cfg.threads:
        torch.set_num_threads(_number(cfg, "threads", int, 1))
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)

    t0 = time.perf_counter()
    loaded = load(cfg.ckpt, device)
    model = prepare_model(loaded.model, dtype, cfg.quantize, bool(cfg.compile))
    codec = load_codec(to_dict(cfg.codec), device, model.cfg.num_codebooks)
    load_seconds = time.perf_counter() - t0
    log.info(
        "loaded %s (%s) and codec %s in %.2f s on %s",
        cfg.ckpt,
        loaded.source,
        codec.identity,
        load_seconds,
        device,
    )
    if codec.random_weights:
        log.warning("codec %s has RANDOM weights: the audio it decodes is noise, not speech", codec.identity)

    context = load_references(
        cfg.reference_audio, cfg.reference_text, settings.speaker, codec, cfg.reference_max_seconds
    )
    if context:
        log.info("voice prompt: %d clip(s), %d frames", len(context), sum(s.codes.shape[1] for s in context))
    synth = Synthesizer(model, loaded.tokenizer, codec, settings, context)
    jobs = [synth.job(i + 1, text, path) for i, (text, path) in enumerate(zip(texts, paths, strict=True))]
    log.info(
        "seed %d, %d utterance(s), %d piece(s)", settings.seed, len(jobs), sum(len(j.pieces) for j in jobs)
    )

    metrics, wall = [], 0.0
    for start in range(0, len(jobs), batch_size):
        results = synth.run_batch(jobs[start : start + batch_size])
        wall += results[0].generation_seconds
        for result in results:
            m = metrics_of(result, load_seconds, settings.seed, settings.stream, codec.sample_rate)
            if cfg.save_codes:
                codes_path = result.job.path.with_suffix(".codes.npy")
                np.save(codes_path, result.all_codes().numpy().astype(np.int64))  # [32, frames]
                m["codes_path"] = str(codes_path)
            log.info(_summary(m))
            metrics.append(m)
    if cfg.metrics_out:
        _write_json(Path(str(cfg.metrics_out)), metrics)
    audio = sum(m["audio_seconds"] for m in metrics)
    rtf = f"RTF {wall / audio:.3f}" if audio > 0 else "no audio"
    log.info(
        "done: %d file(s), %.2f s of audio in %.2f s (%s), in %s",
        len(metrics),
        audio,
        wall,
        rtf,
        paths[0].parent,
    )
    return metrics


def _write_json(path: Path, metrics: list[dict[str, Any]]) -> None:
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
    from elise.synthesis.errors import SynthesisError

    try:
        run(cfg)
    except (SynthesisError, CheckpointError, CodecUnavailable, OSError) as err:
        exit_with(err)
