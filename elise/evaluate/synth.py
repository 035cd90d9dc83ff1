"""Checkpoint mode: synthesize the evaluation set with ``elise.synthesis.Synthesizer`` (one pass per
reference voice), keep the wavs, then score them. ``evaluate_checkpoint`` is the Python entry."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from elise.checkpoints import Loaded
from elise.data.audio import write_wav
from elise.evaluate.report import write_report
from elise.evaluate.score import Scorer
from elise.evaluate.sources import RATE, Item, Line
from elise.synthesis.engine import Request, Settings, Synthesizer
from elise.synthesis.prompt import as_list, check_references
from elise.synthesis.text import LengthBound


def voices(reference_audio: object, reference_text: object) -> list[tuple[str | None, str | None]]:
    """(clip, transcript) per reference voice; [(None, None)] without one (the checkpoint's own voice)."""
    clips, texts = [str(p) for p in as_list(reference_audio)], [str(t) for t in as_list(reference_text)]
    if not clips:
        return [(None, None)]
    if len(texts) != len(clips):
        raise ValueError(f"reference_text needs one transcript per reference_audio clip ({len(clips)})")
    return list(zip(clips, texts, strict=True))


def synthesize_lines(synth: Synthesizer, lines: Sequence[Line], out: Path, voice_list: list, max_seconds: float,
                     progress: bool = True) -> list[Item]:  # fmt: skip
    """Every line with every voice: wavs under ``out/wavs`` (``<id>.wav``, ``v<k>_<id>.wav`` per voice)."""
    from tqdm import tqdm

    wav_dir = out / "wavs"
    wav_dir.mkdir(parents=True, exist_ok=True)
    items: list[Item] = []
    bs = max(1, int(synth.settings.batch_size))
    bar = tqdm(total=len(lines) * len(voice_list), desc="synthesize", unit="utt", disable=not progress)
    for v, (clip, text) in enumerate(voice_list):
        clips = check_references(clip, text, max_seconds) if clip else None
        synth.set_voice(clip, text, max_seconds, clips)
        for start in range(0, len(lines), bs):
            batch = lines[start : start + bs]
            results = synth.synthesize([Request(line.text) for line in batch])
            for line, result in zip(batch, results, strict=True):
                name = f"{line.id}.wav" if len(voice_list) == 1 else f"v{v}_{line.id}.wav"
                audio = result.audio.numpy()
                write_wav(wav_dir / name, audio, result.sample_rate)
                if result.sample_rate != RATE:
                    from elise.data.audio import resample

                    audio = resample(audio, result.sample_rate, RATE)
                items.append(Item(line.id, line.text, str(wav_dir / name), audio, kind=line.kind, reference=clip,
                                  eos=all(result.eos), rtf=result.metrics["rtf"],
                                  voice=v if clip else None))  # fmt: skip
            bar.update(len(batch))
    bar.close()
    return items


def settings_of(synth_settings: dict[str, Any]) -> Settings:
    """``Settings`` from its fields; ``length`` may be a ``LengthBound`` or a dict of its fields."""
    fields = dict(synth_settings)
    length = fields.pop("length", None)
    settings = Settings(**fields)
    if isinstance(length, LengthBound):
        settings.bound = length
    elif length:
        settings.bound = LengthBound(**dict(length))
    return settings


def default_scorer(scorer: Scorer | None, metrics: Sequence[str] | None, asr: str, asr_model: str | None,
                   sim: str, sim_model: str | None, mos: str, device: str) -> Scorer:  # fmt: skip
    """``scorer``, else one with these backends for ``metrics`` (None: every metric)."""
    if scorer is not None:
        return scorer
    from elise.evaluate.score import METRICS

    return Scorer(metrics or METRICS, asr, asr_model, sim, sim_model, mos, device)


def load_synthesizer(ckpt: str | Loaded, codec: dict[str, Any] | str | None, device: str, dtype: str,
                     settings: Settings, base: str | None) -> tuple[Synthesizer, float]:  # fmt: skip
    """``Synthesizer.load`` of a checkpoint or of a model in memory (``Loaded``); and its seconds."""
    t0 = time.perf_counter()
    synth = Synthesizer.load(ckpt, codec, device, dtype, settings=settings, base=base)
    return synth, time.perf_counter() - t0


def run_record(ckpt: str | Loaded, synth: Synthesizer, settings: Settings, seconds: dict[str, float],
               **extra: Any) -> dict[str, Any]:  # fmt: skip
    """The report's ``run`` entry: what was evaluated, with which codec and settings, in what time."""
    name = str(ckpt.meta.get("name", "a model in memory")) if isinstance(ckpt, Loaded) else str(ckpt)
    return {
        "ckpt": name, "codec": synth.codec.identity, "random_codec": bool(getattr(synth.codec, "random_weights", False)),
        **extra,
        "settings": {k: v for k, v in vars(settings).items() if k != "bound"} | {"length": vars(settings.bound)},
        **{f"{k}_seconds": round(v, 2) for k, v in seconds.items()},
    }  # fmt: skip


def evaluate_checkpoint(
    ckpt: str | Loaded,
    texts: Sequence[str] | Sequence[Line],
    out: str | Path,
    reference_audio: object = None,
    reference_text: object = None,
    speaker_ref: Sequence[str] | None = None,
    *,
    codec: dict[str, Any] | str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    metrics: Sequence[str] | None = None,
    asr: str = "auto",
    asr_model: str | None = None,
    sim: str = "auto",
    sim_model: str | None = None,
    mos: str = "auto",
    reference_max_seconds: float = 30.0,
    scorer: Scorer | None = None,
    progress: bool = True,
    base: str | None = None,
    **synth_settings: Any,
) -> dict[str, Any]:
    """Synthesize ``texts`` with checkpoint ``ckpt`` (or a model in memory: ``Loaded``) into ``out/wavs``,
    score them, write the reports in ``out``; returns the eval_report dict. ``synth_settings`` are
    ``Settings`` fields (temperature, top_k, seed, batch_size, speaker, ...); ``length`` may be a
    ``LengthBound`` or a dict of its fields. ``base``: a LoRA checkpoint's base weights (None: the path
    it records)."""
    out = Path(out)
    lines = [t if isinstance(t, Line) else Line(f"{i + 1:04d}", str(t)) for i, t in enumerate(texts)]
    voice_list = voices(reference_audio, reference_text)
    scorer = default_scorer(scorer, metrics, asr, asr_model, sim, sim_model, mos, device)
    settings = settings_of(synth_settings)
    synth, load_seconds = load_synthesizer(ckpt, codec, device, dtype, settings, base)
    t1 = time.perf_counter()
    items = synthesize_lines(synth, lines, out, voice_list, reference_max_seconds, progress)
    synth_seconds = time.perf_counter() - t1
    t2 = time.perf_counter()
    report = scorer.score(items, speaker_ref, progress)
    seconds = {"load": load_seconds, "synthesis": synth_seconds, "scoring": time.perf_counter() - t2}
    report["run"] = run_record(ckpt, synth, settings, seconds)
    write_report(report, out)
    return report
