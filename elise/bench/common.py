"""Shared bench helpers: alternating timing, memory bandwidth, peak memory, machine facts, tables, JSON."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from elise.model.kernels import cpu_name

RESULTS = Path("outputs/bench/bench_results.json")


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def alternate(
    cases: Mapping[str, Callable[[], float | None]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run every case once per repetition, in turn (so slow drifts of the machine hit all sides alike).

    A case returns the seconds it measured itself (e.g. per frame) or None to be timed as a whole.
    The first ``warmup`` rounds are run and dropped. Returns the kept times of each case.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + reps):
        for name, fn in cases.items():
            start = time.perf_counter()
            got = fn()
            elapsed = time.perf_counter() - start if got is None else got
            if r >= warmup:
                times[name].append(elapsed)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def memory_bandwidth(mib: int = 1024, reps: int = 5) -> float:
    """Memory read bandwidth in GB/s: the fastest of ``reps`` sums of a ``mib`` MiB fp32 tensor (far larger
    than the caches), the same access pattern as a matrix-vector product streaming its weights.
    Random contents: a VM may merge identical pages (a tensor of ones then reads from cache, 2x too fast)."""
    x = torch.rand(mib * 1024 * 1024 // 4, generator=torch.Generator().manual_seed(0))
    x.sum()  # touch every page first
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / min(times) / 1e9  # the fastest: other processes only ever slow it


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every ``interval`` s from a thread
    (torch allocations are invisible to tracemalloc; ``ru_maxrss`` is a per-process high-water mark
    and cannot separate two models measured in one process). ``peak_bytes`` after the block."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak_bytes, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> PeakRSS:
        _release_free_heap()  # freed-but-held heap would hide new allocations from RSS
        self.base = self.top = _rss_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.top = max(self.top, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.top = max(self.top, _rss_bytes())
        self.peak_bytes = self.top - self.base


def machine_info() -> dict[str, Any]:
    """The facts a reader needs to compare figures: CPU, cores, threads, library versions, load, date."""
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    info["loadavg_1m"] = load_average()
    return info


def load_average() -> float | None:
    """1-minute load average: other processes sharing the cores make every figure slower."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def fmt(x: Any) -> str:
    if isinstance(x, float):
        if x != x:  # nan
            return "-"
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return "-" if x is None else str(x)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` (missing cells shown as -)."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(row) for row in cells])


def write_json(results: dict[str, Any], path: Path = RESULTS) -> Path:
    """Merge ``results`` into the JSON file (parts run separately keep each other's figures)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
    old.update(results)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(old, indent=1, default=str))
    tmp.replace(path)
    return path
