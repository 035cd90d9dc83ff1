"""The bad-data report of a preparation: built (``prepare_report``), printed (``print_report``),
written (``write_json``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from elise.data.checks import REASONS
from elise.data.items import Example

UNNAMED_SPEAKER = "(no speaker: id 0)"


def prepare_report(
    cfg: dict,
    kept: list[dict],
    skipped: list[dict],
    examples: list[Example],
    counts: dict,
    speakers: dict[str, int],
    codec_identity: str,
    cache_root: Path,
    secs: float,
) -> dict:
    """The report of a preparation: counts (total, kept, train, val, encoded, cached), hours, skips
    by reason and each skipped item, speakers (name -> id) and kept clips per speaker."""
    reasons = dict.fromkeys(REASONS, 0)
    for s in skipped:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    names = sorted({r["speaker_name"] for r in kept if r["speaker_name"] is not None})
    clips = {n: 0 for n in names}
    for r in kept:
        name = r["speaker_name"] if r["speaker_name"] is not None else UNNAMED_SPEAKER
        clips[name] = clips.get(name, 0) + 1
    return {
        "source": cfg["source"],
        "total": len(kept) + len(skipped),
        "kept": len(examples),
        "train": sum(e.split == "train" for e in examples),
        "val": sum(e.split == "val" for e in examples),
        "hours": round(sum(r["seconds"] for r in kept) / 3600, 4),
        "skipped": reasons,
        "items": skipped,
        "encoded": counts["encoded"],
        "cached": counts["cached"],
        "speakers": {n: speakers[n] for n in names},  # name -> id (the `speaker=` of synthesis)
        "speaker_clips": clips,  # name -> kept clips (clips without a speaker: UNNAMED_SPEAKER, id 0)
        "codec": codec_identity,
        "cache_dir": str(cache_root),
        "seconds": round(secs, 3),
    }


def print_report(report: dict) -> None:
    """The report as a rich table: kept/train/val, then the count of each skip reason that occurred."""
    from rich.console import Console
    from rich.table import Table

    hours = report["hours"]
    table = Table(title=f"data: {report['source']}")
    table.add_column("items")
    table.add_column("count", justify="right")
    for name in ("total", "kept", "train", "val", "encoded", "cached"):
        table.add_row(name, str(report[name]))
    table.add_row("audio kept", f"{hours:.2f} h" if hours >= 1 else f"{hours * 60:.1f} min")
    for reason, count in report["skipped"].items():
        if count:
            table.add_row(f"skipped: {reason}", str(count), style="yellow")
    speakers = report.get("speakers", {})
    for name, count in list(report.get("speaker_clips", {}).items())[:20]:
        label = f"speaker {name} (id {speakers[name]})" if name in speakers else name
        table.add_row(label, str(count))
    Console().print(table)


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON, atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
