"""``trainer.precision=auto``: bf16-mixed where this machine runs the model's matmuls faster in bf16.

On a GPU with bf16 support, bf16-mixed. On a CPU the answer depends on the chip (bf16 matrix units:
AMX, avx512_bf16) and on the model's widths, so it is measured, never looked up: the training step's
largest matmul shapes (the backbone's MLP projections, forward and both backward products) are timed
in fp32 and in bf16 with the input casts autocast does, alternating, best of a few rounds. bf16-mixed
is kept when its matmuls are at least ``MIN_SPEEDUP`` times faster (a step is not only matmuls:
the casts and the fp32 element-wise work stay), else 32-true.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# bf16 matmuls must be this much faster than fp32 for bf16-mixed to pay on CPU
MIN_SPEEDUP = 1.5
# rows of the probe's matmuls (a training batch has hundreds to thousands)
PROBE_ROWS = 256


@dataclass
class PrecisionChoice:
    """The chosen Lightning precision, the probe's timings (s per round of the shapes) and why."""

    precision: str
    fp32_s: float | None
    bf16_s: float | None
    reason: str


def probe_shapes(model_cfg: Mapping[str, Any], rows: int = PROBE_ROWS) -> list[tuple[int, int, int]]:
    """(M, K, N) of the backbone MLP's matmuls in one training step: up/gate forward [rows, dim] x
    [dim, hidden], down forward, and the weight-gradient product [hidden, rows] x [rows, dim]."""
    b = model_cfg["backbone"]
    dim, hidden = int(b["dim"]), int(b["mlp_hidden"])
    return [(rows, dim, hidden), (rows, hidden, dim), (hidden, rows, dim)]


def time_matmuls(
    shapes: list[tuple[int, int, int]], rounds: int = 5, min_s: float = 0.02
) -> tuple[float, float]:
    """(fp32 s, bf16 s) per pass of ``x @ w.T`` over ``shapes``, bf16 with the casts of fp32 inputs and
    weights that autocast does. A round repeats the pass until the fp32 one takes ``min_s`` (small
    shapes would time the scheduler); the dtypes alternate within each round; the best round counts
    (a busy machine only ever adds time)."""
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)) for m, k, n in shapes]

    def one_pass(dtype: str) -> None:
        for x, w in pairs:
            F.linear(x.bfloat16(), w.bfloat16()) if dtype == "bf16" else F.linear(x, w)

    for dtype in ("fp32", "bf16"):  # warm the kernels up
        one_pass(dtype)
    start = time.perf_counter()
    one_pass("fp32")
    repeat = max(1, min(1000, math.ceil(min_s / max(time.perf_counter() - start, 1e-9))))
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for _ in range(rounds):
        for dtype in ("fp32", "bf16"):
            start = time.perf_counter()
            for _ in range(repeat):
                one_pass(dtype)
            best[dtype] = min(best[dtype], (time.perf_counter() - start) / repeat)
    return best["fp32"], best["bf16"]


def choose_precision(model_cfg: Mapping[str, Any], cpu: bool, processes: int = 1) -> PrecisionChoice:
    """Resolve ``trainer.precision=auto`` for a model config on this machine (see the module docstring).
    ``processes``: training processes; several on a CPU keep fp32 (each would time its own probe on
    shared cores and ranks could choose differently)."""
    if cpu and processes > 1:
        return PrecisionChoice("32-true", None, None, f"{processes} CPU processes: fp32 (no per-rank probe)")
    if not cpu:
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return PrecisionChoice(
            "bf16-mixed" if ok else "32-true", None, None, "GPU " + ("with" if ok else "without") + " bf16"
        )
    shapes = probe_shapes(model_cfg)
    fp32, bf16 = time_matmuls(shapes)
    speedup = fp32 / bf16
    precision = "bf16-mixed" if speedup >= MIN_SPEEDUP else "32-true"
    reason = (
        f"CPU matmul probe {shapes}, {torch.get_num_threads()} threads: fp32 {fp32 * 1e3:.1f} ms, "
        f"bf16 {bf16 * 1e3:.1f} ms ({speedup:.2f}x; bf16-mixed needs >= {MIN_SPEEDUP}x)"
    )
    return PrecisionChoice(precision, fp32, bf16, reason)
