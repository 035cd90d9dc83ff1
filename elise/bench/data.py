"""Data speed: Mimi encode throughput (audio seconds per second, batched vs one clip at a time) and
the cache-hit time of ``elise.data.prepare`` on the bundled sample set."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

from elise.bench.common import alternate, median


def encode_cases(codec, clips: int, seconds: float) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    n = int(seconds * codec.sample_rate)
    wav = 0.1 * torch.randn(clips, 1, n, generator=g)  # [B, 1, N]
    lengths = torch.full((clips,), n)

    def batched() -> None:
        codec.encode(wav, lengths)

    def one_by_one() -> None:
        for i in range(clips):
            codec.encode(wav[i : i + 1], lengths[i : i + 1])

    return {"batched": batched, "one_by_one": one_by_one}


def bench_encode(
    codec_name: str = "mimi_random", clips: int = 8, seconds: float = 4.0, reps: int = 3
) -> dict[str, Any]:
    """Audio seconds encoded per wall second, batched (the codec's own batch size) vs one by one."""
    from elise.codec import build_codec

    codec = build_codec(codec_name)
    times = alternate(encode_cases(codec, clips, seconds), reps, warmup=1)
    audio = clips * seconds
    res: dict[str, Any] = {"codec": codec_name, "clips": clips, "clip_seconds": seconds, "reps": reps}
    for name, ts in times.items():
        res[name] = {"s": median(ts), "audio_s_per_s": audio / median(ts)}
    res["batched_vs_one_by_one"] = res["batched"]["audio_s_per_s"] / res["one_by_one"]["audio_s_per_s"]
    return res


def bench_prepare(codec_name: str = "mimi_random", reps: int = 3) -> dict[str, Any]:
    """``prepare`` on the sample set: the first (encoding) run, then the median cache-hit run."""
    try:
        from elise.codec import build_codec
        from elise.data.prepare import prepare
        from elise.text import ByteTokenizer
    except ImportError as e:
        return {"skipped": f"elise.data.prepare unavailable: {e}"}
    codec = build_codec(codec_name)
    with tempfile.TemporaryDirectory(prefix="elise_bench_") as cache:
        cfg = {"source": "sample", "cache_dir": cache}
        start = time.perf_counter()
        first = prepare(cfg, codec, ByteTokenizer(), progress=False)
        cold = time.perf_counter() - start
        hits = []
        for _ in range(reps):
            start = time.perf_counter()
            prepare(cfg, codec, ByteTokenizer(), progress=False)
            hits.append(time.perf_counter() - start)
    return {"items": len(first.examples), "first_run_s": cold, "cache_hit_s": median(hits), "reps": reps}


def bench_data(quick: bool = False) -> dict[str, Any]:
    return {
        "encode": bench_encode(
            clips=4 if quick else 8, seconds=2.0 if quick else 4.0, reps=1 if quick else 3
        ),
        "prepare": bench_prepare(reps=1 if quick else 3),
    }


def data_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    enc, prep = res["encode"], res["prepare"]
    rows = [{"case": f"{enc['codec']} encode {k}", "audio s/s": enc[k]["audio_s_per_s"], "s": enc[k]["s"]}
            for k in ("batched", "one_by_one")]  # fmt: skip
    if "skipped" not in prep:
        rows.append(
            {"case": f"prepare sample set ({prep['items']} clips), first run", "s": prep["first_run_s"]}
        )
        rows.append({"case": "prepare sample set, cache hit", "s": prep["cache_hit_s"]})
    return rows
