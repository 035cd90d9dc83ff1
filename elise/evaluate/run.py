"""``python -m elise.evaluate``'s body (keys: ``elise/conf/evaluate.yaml``): checkpoint, audio or compare
mode; user errors are one line and exit 2."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from elise.config import to_dict
from elise.data.sources import AUDIO_SUFFIXES
from elise.evaluate.report import summary_table, write_report
from elise.evaluate.score import Scorer
from elise.evaluate.sources import Skipped, read_audio_items, read_eval_set

log = logging.getLogger("elise.evaluate")


def _list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, ListConfig | list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def speaker_clips(value: Any) -> list[str]:
    """``speaker_ref=``: a file, a list of files, or a folder of audio files."""
    clips = []
    for entry in _list(value):
        path = Path(entry).expanduser()
        if path.is_dir():
            clips += sorted(str(p) for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
        elif path.is_file():
            clips.append(str(path))
        else:
            raise FileNotFoundError(f"speaker_ref={entry}: no such file or folder")
    if _list(value) and not clips:
        raise FileNotFoundError(f"speaker_ref={value}: no audio files")
    return clips


def out_dir(cfg: DictConfig) -> Path:
    """``out`` (refused when it holds a report, unless overwrite) or a new ``outputs/eval/<time>``."""
    if cfg.out:
        out = Path(str(cfg.out)).expanduser()
        if (out / "eval_report.json").exists() and not cfg.overwrite:
            raise FileExistsError(f"out={out} already holds an eval_report.json (overwrite=true replaces it)")
        out.mkdir(parents=True, exist_ok=True)
        return out
    from elise.rundir import claim_dir

    return claim_dir(Path("outputs/eval") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}")


def scorer_from(cfg: DictConfig, device: str) -> Scorer:
    return Scorer(_list(cfg.metrics), cfg.asr.backend, cfg.asr.get("model"), cfg.sim.backend, cfg.sim.get("model"),
                  cfg.mos.backend, device, int(cfg.bootstrap))  # fmt: skip


def run_compare(cfg: DictConfig) -> dict[str, Any]:
    from elise.evaluate.compare import compare, load_report, table

    paths = _list(cfg.compare)
    if len(paths) != 2:
        raise ValueError(
            f"compare needs two reports: compare=[a/eval_report.json,b/eval_report.json], got {paths}"
        )
    result = compare(load_report(paths[0]), load_report(paths[1]), int(cfg.bootstrap))
    print(table(result, paths[0], paths[1]))
    return result


def run_audio(cfg: DictConfig) -> dict[str, Any]:
    skipped = Skipped()
    items = read_audio_items(str(cfg.audio), skipped, cfg.limit)
    if not items:
        raise ValueError(f"audio={cfg.audio}: nothing to score ({dict(skipped.counts) or 'no entries'})")
    for reason, n in skipped.counts.items():
        log.warning(
            "skipped %d entr%s (%s), e.g. %s", n, "y" if n == 1 else "ies", reason, skipped.examples[reason]
        )
    out = out_dir(cfg)
    device = "cuda" if str(cfg.device) in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    scorer = scorer_from(cfg, device)
    report = scorer.score(items, speaker_clips(cfg.speaker_ref) or None, progress=bool(cfg.progress))
    report["skipped"] = dict(skipped.counts)
    report["run"] = {"audio": str(cfg.audio)}
    write_report(report, out)
    print(summary_table(report["summary"]))
    print(f"report: {out / 'eval_report.md'}")
    return report


def run_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    from elise.evaluate.synth import evaluate_checkpoint
    from elise.synthesis.runtime import resolve_device
    from elise.synthesize import settings_from

    if cfg.get("dialogue") is not None or cfg.get("dialogue_file"):
        return run_dialogue(cfg)
    lines = read_eval_set(str(cfg.eval_set), cfg.limit, _list(cfg.kinds) or None)
    if not lines:
        raise ValueError(f"eval_set={cfg.eval_set}: no lines to synthesize (kinds={cfg.kinds})")
    settings = settings_from(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = str(resolve_device(cfg.device))
    speaker_ref = speaker_clips(cfg.speaker_ref) or None
    scorer = scorer_from(cfg, device)
    out = out_dir(cfg)
    codec_node = cfg.get("codec")
    codec = to_dict(codec_node) if isinstance(codec_node, DictConfig) else codec_node
    reference_audio = OmegaConf.to_object(cfg.reference_audio) if isinstance(cfg.reference_audio, ListConfig) else cfg.reference_audio  # fmt: skip
    reference_text = OmegaConf.to_object(cfg.reference_text) if isinstance(cfg.reference_text, ListConfig) else cfg.reference_text  # fmt: skip
    report = evaluate_checkpoint(
        str(cfg.ckpt), lines, out, reference_audio, reference_text, speaker_ref, codec=codec, device=device,
        dtype=str(cfg.dtype), scorer=scorer, reference_max_seconds=float(cfg.reference_max_seconds),
        progress=bool(cfg.progress), base=cfg.get("base"), **{k: v for k, v in vars(settings).items() if k != "bound"},
        length=settings.bound,
    )  # fmt: skip
    print(summary_table(report["summary"]))
    print(f"report: {out / 'eval_report.md'}")
    return report


def run_dialogue(cfg: DictConfig) -> dict[str, Any]:
    """``ckpt=`` with ``dialogue=``/``dialogue_file=``: the conversations in place of the evaluation set."""
    from elise.evaluate.dialogue import evaluate_dialogue
    from elise.synthesis.dialogue import read_scripts
    from elise.synthesis.runtime import resolve_device
    from elise.synthesize import settings_from

    if cfg.reference_audio or cfg.reference_text is not None:
        raise ValueError(
            "reference_audio is for the evaluation set; give the speakers voices={name: {audio, text}}"
        )
    if cfg.context_turns is not None and int(cfg.context_turns) < 0:
        raise ValueError(f"context_turns={cfg.context_turns}: use 0 or more (null: as many as fit)")
    scripts = read_scripts(cfg.dialogue, cfg.dialogue_file)
    settings = settings_from(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = str(resolve_device(cfg.device))
    speaker_ref = speaker_clips(cfg.speaker_ref) or None
    node = cfg.voices
    voices = to_dict(node) if isinstance(node, DictConfig) else node
    scorer = scorer_from(cfg, device)
    out = out_dir(cfg)
    codec_node = cfg.get("codec")
    codec = to_dict(codec_node) if isinstance(codec_node, DictConfig) else codec_node
    report = evaluate_dialogue(
        str(cfg.ckpt), scripts, out, voices, speaker_ref, codec=codec, device=device, dtype=str(cfg.dtype),
        base=cfg.get("base"), context_turns=None if cfg.context_turns is None else int(cfg.context_turns),
        reference_max_seconds=float(cfg.reference_max_seconds), scorer=scorer,
        **{k: v for k, v in vars(settings).items() if k != "bound"}, length=settings.bound,
    )  # fmt: skip
    print(summary_table(report["summary"]))
    print(
        f"report: {out / 'eval_report.md'} ({len(report['items'])} turns of {len(scripts)} conversation(s))"
    )
    return report


def run(cfg: DictConfig) -> dict[str, Any]:
    """The mode ``cfg`` asks for: compare, audio or ckpt (exactly one)."""
    modes = [k for k in ("ckpt", "audio", "compare") if cfg.get(k) is not None]
    if len(modes) != 1:
        raise ValueError("give exactly one of ckpt=<checkpoint>, audio=<folder|manifest>, compare=[a,b]"
                         + (f" (got {', '.join(modes)})" if modes else ""))  # fmt: skip
    return {"ckpt": run_checkpoint, "audio": run_audio, "compare": run_compare}[modes[0]](cfg)


def main(cfg: DictConfig) -> None:
    from elise.checkpoints import CheckpointError
    from elise.codec import CodecUnavailable
    from elise.errors import exit_with
    from elise.evaluate.backends import BackendUnavailable
    from elise.synthesis.errors import SynthesisError

    try:
        run(cfg)
    except (
        ValueError,
        OSError,
        BackendUnavailable,
        SynthesisError,
        CheckpointError,
        CodecUnavailable,
    ) as err:
        exit_with(err)
