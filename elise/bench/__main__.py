"""``python -m elise.bench [part=all|synth|train|data|gpu|serve|lora] [quick=true] [threads=N] [out=PATH]``
(keys: ``elise/conf/bench.yaml``, run through ``elise.cli``).

Prints a table per part and merges the figures into ``outputs/bench/bench_results.json``
(see BENCHMARKS.md for what each figure means and the targets).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig

from elise.bench.common import machine_info, set_threads, table, write_json
from elise.errors import exit_with

PARTS = ("synth", "train", "data", "gpu", "serve", "lora")


def quiet() -> None:
    """Keep the tables readable: transformers' load reports and deprecation warnings off."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def run_part(part: str, quick: bool, ckpt: str | None = None) -> tuple[dict, str]:
    """Run one part; returns (figures, printable table)."""
    if part == "synth":
        from elise.bench.synth import bench_synth, synth_text

        res = bench_synth(frames=8 if quick else 16, ref_frames=4 if quick else 8, reps=1 if quick else 3,
                          batches=(8,) if quick else (4, 8), ckpt=ckpt)  # fmt: skip
        return res, synth_text(res)
    if part == "train":
        from elise.bench.train import bench_train, train_rows

        res = bench_train(quick)
        text = table(train_rows(res), ["model", "rows", "case", "tokens/s", "step s", "fwd+bwd s", "adamw s",
                                       "peak MB", "x transformers", "x fwd+bwd", "x both fused", "x both for-loop",
                                       "x fp32"])  # fmt: skip
        for preset, r in res.items():
            text += f"\n{preset}: elise AdamW {r['elise_optim']}, transformers optim={r.get('transformers_optim')}"
        return res, text + "\n"
    if part == "lora":
        from elise.bench.lora import bench_lora, lora_rows

        res = bench_lora(quick)
        cols = ["model", "rows", "case", "trainable", "tokens/s", "step s", "peak MB", "ckpt MB", "x full (peak)",
                "x full (tokens/s)"]  # fmt: skip
        return res, table(lora_rows(res), cols)
    if part == "data":
        from elise.bench.data import bench_data, data_rows

        res = bench_data(quick)
        return res, table(data_rows(res), ["case", "audio s/s", "clips/s", "s", "MB"])
    if part == "serve":
        from elise.bench.serve import bench_serve, serve_rows

        res = bench_serve(quick)
        cols = ["case", "max_batch", "clients", "audio_s_per_s", "vs max_batch=1", "ttfb_p50", "ttfb_p95",
                "latency_p50", "latency_p95", "prefill_s", "frame_s", "decode_s"]  # fmt: skip
        return res, table(serve_rows(res), cols)
    from elise.bench.gpu import bench_gpu

    res = bench_gpu(quick)
    return res, res.get("skipped") or str(res)


def bench_args(cfg: DictConfig) -> tuple[tuple[str, ...], bool, int, Path]:
    """(parts, quick, threads, out) from the composed ``bench`` config; a wrong value is one line, exit 2."""
    if cfg.part not in (*PARTS, "all"):
        exit_with(f"part={cfg.part}: no such part; choose one of: all, {', '.join(PARTS)}")
    if not isinstance(cfg.quick, bool):
        exit_with(f"quick={cfg.quick}: write quick=true or quick=false")
    if isinstance(cfg.threads, bool) or not isinstance(cfg.threads, int) or cfg.threads < 1:
        exit_with(f"threads={cfg.threads}: a whole number of CPU threads, 1 or more")
    parts = PARTS if cfg.part == "all" else (str(cfg.part),)
    return parts, cfg.quick, cfg.threads, Path(str(cfg.out))


def main(cfg: DictConfig) -> int:
    """Run the parts ``cfg`` names (``elise/conf/bench.yaml``), printing a table for each."""
    parts, quick, threads, out = bench_args(cfg)
    ckpt = str(cfg.ckpt) if cfg.get("ckpt") else None
    if ckpt is not None and not Path(ckpt).exists():
        exit_with(f"ckpt={ckpt}: no such checkpoint (an elise .ckpt or a transformers csm directory)")
    quiet()
    set_threads(threads)
    typed = [a for a in sys.argv[1:] if not a.startswith("hydra.")]
    results: dict = {"machine": machine_info(), "command": " ".join(["python -m elise.bench", *typed])}
    start = time.perf_counter()
    for part in parts:
        t0 = time.perf_counter()
        res, text = run_part(part, quick, ckpt)
        res["wall_s"] = time.perf_counter() - t0
        results[part] = res
        print(f"\n## {part} ({res['wall_s']:.0f} s)\n{text}", flush=True)
        write_json(results, out)
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {threads} threads, torch {m['torch']}, load {m['loadavg_1m']}; "
          f"{time.perf_counter() - start:.0f} s; figures in {out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    from elise.cli import main as cli_main

    cli_main("bench")
