"""Write an eval report: ``eval_report.json`` (the dict), ``eval_report.md`` (tables) and
``eval_report.png`` (metric distributions and the worst items)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LABELS = {
    "wer": "WER", "cer": "CER", "sim": "SIM", "mos": "MOS (OVRL)", "mos_sig": "MOS SIG", "mos_bak": "MOS BAK",
    "eos_rate": "EOS rate", "duration_ratio": "duration ratio", "rtf": "RTF",
}  # fmt: skip
LOWER_IS_BETTER = {"wer", "cer", "rtf"}


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, int]]:
    """(label, mean, 95 % interval, n) per summarised metric."""
    rows = []
    for key, label in LABELS.items():
        s = summary.get(key)
        if s and s["mean"] is not None:
            rows.append((label, fmt(s["mean"]), f"{fmt(s['low'])} - {fmt(s['high'])}", s["n"]))
    return rows


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (also what the command prints)."""
    lines = ["| metric | mean | 95 % interval | n |", "|---|---|---|---|"]
    lines += [f"| {label} | {mean} | {ci} | {n} |" for label, mean, ci, n in summary_rows(summary)]
    return "\n".join(lines)


def markdown(report: dict[str, Any], worst: int = 10) -> str:
    summary, backends = report["summary"], report["backends"]
    counts = summary["counts"]
    parts = [
        "# Evaluation report",
        "",
        f"{counts['items']} utterances, {counts['seconds']} s of audio; cut: {counts['cut']}, long: {counts['long']}, "
        f"nothing recognised: {counts['empty_transcript']}.",
    ]
    if report.get("skipped"):
        parts.append(f"Skipped: {', '.join(f'{k} {v}' for k, v in report['skipped'].items())}.")
    parts += [
        "",
        summary_table(summary),
        "",
        "Backends: " + ", ".join(f"{k} = {v}" for k, v in backends.items()),
    ]
    if backends.get("asr_comparable") is False:
        parts.append(
            "\nThe recogniser is not the Seed-TTS-eval one: its WER/CER compare runs scored with it only."
        )
    vm = report.get("voice_match")
    if vm:
        refs = [Path(r).name for r in vm["references"]]
        parts += ["", f"## Voice match: {vm['matched_share']:.0%} of {vm['n']} outputs closest to their own reference",
                  "", "| output voice \\ reference | " + " | ".join(refs) + " |", "|---" * (len(refs) + 1) + "|"]  # fmt: skip
        parts += [
            f"| {refs[i]} | " + " | ".join(fmt(v) for v in row) + " |" for i, row in enumerate(vm["matrix"])
        ]
    if report.get("conversations"):
        parts += ["", "## Conversations", "", *conversation_table(report)]
    items = report["items"]
    if items and "wer" in items[0]:
        parts += ["", f"## Worst {min(worst, len(items))} by WER", "", "| id | WER | text | transcript | flags |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in sorted(items, key=lambda r: -r["wer"])[:worst]:
            cells = [r["id"], fmt(r["wer"], 2), r["text"].replace("|", "/"), r["transcript"].replace("|", "/"),
                     " ".join(r["flags"])]  # fmt: skip
            parts.append("| " + " | ".join(cells) + " |")
    return "\n".join(parts) + "\n"


def conversation_table(report: dict[str, Any]) -> list[str]:
    """Dialogue mode: one row per conversation (turns, seconds, the mean of each per-turn metric, flags)."""
    items = report["items"]
    keys = [
        k
        for k in ("wer", "cer", "sim", "mos", "duration_ratio", "rtf")
        if any(r.get(k) is not None for r in items)
    ]
    has_eos = any(r.get("eos") is not None for r in items)
    head = ["conversation", "turns", "seconds", *(LABELS[k] for k in keys), *(["EOS rate"] if has_eos else []),
            "cut", "long"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, conv in report["conversations"].items():
        turns = [r for r in items if r.get("conversation") == name]
        cells = [name.replace("|", "/"), str(len(turns)), fmt(conv.get("seconds"), 2)]
        cells += [fmt(_mean([r.get(k) for r in turns])) for k in keys]
        if has_eos:
            cells.append(fmt(_mean([None if r.get("eos") is None else float(r["eos"]) for r in turns]), 2))
        cells += [str(sum(flag in r["flags"] for r in turns)) for flag in ("cut", "long")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mean(values: list[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Histograms of the per-item metrics and the worst items by WER; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    items = report["items"]
    keys = [
        k
        for k in ("wer", "cer", "sim", "mos", "duration_ratio", "rtf")
        if any(r.get(k) is not None for r in items)
    ]
    cols = max(len(keys), 1)
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 6.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        values = [r[key] for r in items if r.get(key) is not None]
        ax.hist(values, bins=min(20, max(len(values), 1)), color="#4477aa")
        mean = report["summary"].get(key, {}).get("mean")
        if mean is not None:
            ax.axvline(mean, color="k", linestyle="--", linewidth=1)
        ax.set_title(f"{LABELS.get(key, key)} (mean {fmt(mean, 2)})", fontsize=9)
    worst_ax = axes[1][0]
    for ax in axes[1][1:]:
        ax.axis("off")
    worst_ax.axis("off")
    if items and "wer" in items[0]:
        worst = sorted(items, key=lambda r: -r["wer"])[:10]
        text = "\n".join(f"{r['wer']:.2f}  {r['id']}: {r['text'][:60]}" for r in worst)
        worst_ax.text(0, 1, "worst by WER\n" + text, va="top", family="monospace", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """eval_report.json / .md / .png in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval_report.json", "md": out / "eval_report.md"}
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown(report), encoding="utf-8")
    png = plot(report, out / "eval_report.png")
    if png:
        paths["png"] = png
    return paths
