"""``python -m elise.bench [synth|train|data|gpu|all] [--quick] [--threads N] [--out PATH]``.

Prints a table per part and merges the figures into ``outputs/bench/bench_results.json``
(see BENCHMARKS.md for what each figure means and the targets).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from elise.bench.common import RESULTS, machine_info, set_threads, table, write_json

PARTS = ("synth", "train", "data", "gpu")


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


def run_part(part: str, quick: bool) -> tuple[dict, str]:
    """Run one part; returns (figures, printable table)."""
    if part == "synth":
        from elise.bench.synth import bench_synth, synth_rows

        res = bench_synth(frames=8 if quick else 16, ref_frames=4 if quick else 8, reps=1 if quick else 3,
                          batches=(8,) if quick else (4, 8))  # fmt: skip
        rows = synth_rows(res)
        text = table(rows, ["case", "s/frame", "frames/s", "RTF", "x transformers"])
        bound = res["bound_fp32"], res["bound_int8"]
        text += (
            f"\nmemory read bandwidth {res['bandwidth_gbs']:.1f} GB/s; bound fp32 {bound[0]['bound_s']:.3f} s/frame "
            f"(elise reaches {bound[0]['fraction']:.0%}), int8 {bound[1]['bound_s']:.3f} s/frame "
            f"({bound[1]['fraction']:.0%})\nint8 vs fp32 codes: {res['int8_agreement']}\n"
        )
        text += table([{"case": k, **v} for k, v in res["batch"].items()],
                      ["case", "per_frame_s", "total_frames_per_s", "vs_b1"])  # fmt: skip
        return res, text
    if part == "train":
        from elise.bench.train import bench_train, train_rows

        res = bench_train(quick)
        return res, table(
            train_rows(res), ["model", "rows", "case", "tokens/s", "step s", "peak MB", "x transformers"]
        )
    if part == "data":
        from elise.bench.data import bench_data, data_rows

        res = bench_data(quick)
        return res, table(data_rows(res), ["case", "audio s/s", "s"])
    from elise.bench.gpu import bench_gpu

    res = bench_gpu(quick)
    return res, res.get("skipped") or str(res)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elise.bench", description=__doc__.splitlines()[0])
    p.add_argument("part", nargs="?", default="all", choices=(*PARTS, "all"))
    p.add_argument("--quick", action="store_true", help="fewer frames, rows and repetitions")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"JSON file (default {RESULTS})")
    args = p.parse_args(argv)
    quiet()
    set_threads(args.threads)
    parts = PARTS if args.part == "all" else (args.part,)
    results: dict = {"machine": machine_info(), "command": " ".join(["python -m elise.bench", *sys.argv[1:]])}
    start = time.perf_counter()
    for part in parts:
        t0 = time.perf_counter()
        res, text = run_part(part, args.quick)
        res["wall_s"] = time.perf_counter() - t0
        results[part] = res
        print(f"\n## {part} ({res['wall_s']:.0f} s)\n{text}", flush=True)
        write_json(results, args.out)
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {args.threads} threads, torch {m['torch']}, load {m['loadavg_1m']}; "
          f"{time.perf_counter() - start:.0f} s; figures in {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
