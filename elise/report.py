"""``python -m elise.report run_dir=<run dir>``: loss curves and per-codebook accuracy from metrics.csv -> report.png."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from omegaconf import DictConfig

from elise.errors import exit_with

NUM_CODEBOOKS = 32


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv (Lightning's CSVLogger: one row per log call, empty cells elsewhere) ->
    {metric: [(step, value), ...]} in file order."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    v = float(value)
                except ValueError:
                    continue
                if math.isfinite(v):
                    series.setdefault(key, []).append((int(float(step)), v))
    return series


def last_per_codebook(series: dict[str, list[tuple[int, float]]], prefix: str) -> list[float] | None:
    """The latest value of ``<prefix>0..31``, or None when they were not logged."""
    keys = [f"{prefix}{k}" for k in range(NUM_CODEBOOKS)]
    if not all(series.get(k) for k in keys):
        return None
    return [series[k][-1][1] for k in keys]


def _plot(ax, series: dict, keys: list[str], title: str) -> None:
    for key in keys:
        points = series.get(key)
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        style = "o-" if len(points) < 30 or key.startswith("val/") else "-"
        ax.plot(steps, values, style, label=key, markersize=3, linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.png`` (or ``out``) for a run dir holding metrics.csv; returns its path."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the report needs matplotlib: pip install 'elise[report]'") from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    csv_path = run_dir / "metrics.csv" if run_dir.is_dir() else run_dir
    if not csv_path.is_file():
        raise FileNotFoundError(f"no metrics.csv in {run_dir}")
    series = read_metrics(csv_path)
    if not series.get("train/loss") and not series.get("val/loss"):
        raise ValueError(f"{csv_path} has no train/loss or val/loss values yet")
    evals = any(k.startswith("eval/") for k in series)  # the eval callback's quality figures: a third row
    fig, axes = plt.subplots(3 if evals else 2, 2, figsize=(13, 12.5 if evals else 8.5))
    _plot(axes[0, 0], series, ["train/loss", "val/loss"], "total loss")
    _plot(
        axes[0, 1],
        series,
        ["train/backbone_loss", "train/decoder_loss", "val/backbone_loss", "val/decoder_loss"],
        "backbone (codebook 0) / decoder (codebooks 1-31) loss",
    )
    _plot(axes[1, 0], series, ["train/lr"], "learning rate")
    ax = axes[1, 1]
    width = 0.4
    for offset, prefix, label in (
        (-width / 2, "train/acc_cb", "train (last window)"),
        (width / 2, "val/acc_cb", "val"),
    ):
        acc = last_per_codebook(series, prefix)
        if acc is not None:
            ax.bar([k + offset for k in range(NUM_CODEBOOKS)], acc, width=width, label=label)
    ax.set_title("per-codebook accuracy (latest)")
    ax.set_xlabel("codebook")
    ax.set_ylim(0, 1.15)  # headroom for the legend above bars at 1.0
    ax.set_xticks(range(0, NUM_CODEBOOKS, 2))
    ax.grid(alpha=0.3, axis="y")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    if evals:
        _plot(
            axes[2, 0],
            series,
            ["eval/wer", "eval/cer", "eval/sim", "eval/eos_rate"],
            "eval: WER, CER, SIM, EOS rate",
        )
        _plot(axes[2, 1], series, ["eval/duration_ratio", "eval/mos"], "eval: duration ratio, MOS")
    fig.suptitle(f"elise run: {run_dir.resolve().name}")
    fig.tight_layout()
    out = Path(out) if out else (run_dir if run_dir.is_dir() else run_dir.parent) / "report.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(cfg: DictConfig) -> None:
    """``python -m elise.report run_dir=<dir> [out=<png>]``; a user error is one line, exit 2."""
    try:
        path = write_report(cfg.run_dir, cfg.get("out"))
    except (FileNotFoundError, ValueError, OSError, ImportError) as err:
        exit_with(err)
    print(path)


if __name__ == "__main__":
    from elise.cli import main as cli_main

    cli_main("report")
