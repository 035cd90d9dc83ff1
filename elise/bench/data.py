"""Data speed: Mimi encode throughput (audio seconds per second, batched vs one clip at a time), the
cache-hit time of ``elise.data.prepare`` on the bundled sample set, ``prepare`` throughput (clips/s)
with 0, 1 and 2 decoding workers, and training start-up on a synthetic pre-encoded set of 1,000,000
clips (index build, sampler planning, time to the first batch, peak RSS of the datamodule process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
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


def throughput_folder(root: Path, clips: int) -> Path:
    """An LJSpeech folder of ``clips`` distinct clips: the sample clips at different gains."""
    import soundfile as sf

    from elise.data.sources import read_ljspeech, sample_root

    sample = [it for it in read_ljspeech(sample_root(), speaker_column=False)]
    (root / "wavs").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(clips):
        item = sample[i % len(sample)]
        wav, sr = sf.read(str(item.audio), dtype="float32")
        sf.write(root / "wavs" / f"c{i:05d}.flac", wav * (0.5 + 0.5 * i / clips), sr)
        lines.append(f"c{i:05d}|{item.text}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def parquet_of(folder: Path, out: Path) -> Path:
    """The clips of an LJSpeech folder as one parquet file (audio bytes, text): an audio hub dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from elise.data.sources import read_ljspeech

    items = read_ljspeech(folder, speaker_column=False)
    audio = [{"bytes": Path(str(it.audio)).read_bytes(), "path": Path(str(it.audio)).name} for it in items]
    pq.write_table(pa.table({"audio": audio, "text": [it.text for it in items]}), out, row_group_size=16)
    return out


def bench_prepare_throughput(
    codecs: tuple[str, ...] = ("tiny", "mimi_random"),
    workers: tuple[int, ...] = (0, 1, 2),
    clips: int = 64,
    stream: bool = True,
) -> dict[str, Any]:
    """Clips per second of a first ``prepare`` (decode, resample, encode, shard store) per codec and
    number of decoding worker processes (0: in the main process); worker start-up included.
    ``stream``: also the same clips as a parquet file read with ``data.streaming=true`` (``<codec>/<workers>/stream``)."""
    from elise.codec import build_codec
    from elise.data.prepare import prepare
    from elise.text import ByteTokenizer

    out: dict[str, Any] = {"clips": clips}

    def timed(key: str, cfg: dict, codec: Any, workers: int) -> None:
        start = time.perf_counter()
        prepare(cfg, codec, ByteTokenizer(), progress=False, num_workers=workers)
        secs = time.perf_counter() - start
        out[key] = {"s": secs, "clips_per_s": clips / secs}

    with tempfile.TemporaryDirectory(prefix="elise_bench_") as tmp:
        folder = throughput_folder(Path(tmp) / "lj", clips)
        for name in codecs:
            codec = build_codec(name)
            for w in workers:
                cfg = {
                    "source": "ljspeech",
                    "root": str(folder),
                    "cache_dir": f"{tmp}/{name}-{w}",
                    "store": "shards",
                }
                timed(f"{name}/{w}", cfg, codec, w)
        if stream:
            table = parquet_of(folder, Path(tmp) / "clips.parquet")
            codec = build_codec("tiny")  # built once, outside the timing, as above
            for w in workers:
                spec = {"source": "elise", "path": str(table), "streaming": True, "store": "shards"}
                timed(f"tiny/{w}/stream", spec | {"cache_dir": f"{tmp}/stream-{w}"}, codec, w)
    return out


# ---- a synthetic pre-encoded set at pretraining scale ------------------------------------------

WORDS = [
    f"{a}{b}" for a in ("ka", "lo", "mi", "tes", "ro", "vu", "sha", "ne") for b in ("n", "ra", "st", "do", "")
]


def synthetic_codes(folder: Path, clips: int, per_file: int = 50_000, seed: int = 0) -> Path:
    """``clips`` random-code clips in Arrow files of ``per_file`` rows (id, text, speaker, codes as
    int16 [32, T] bytes); durations log-normal around 6 s, clipped to 1-20 s; 500 speakers. Kept
    across runs (``done.json``): generating 1M clips writes ~5 GB."""
    import pyarrow as pa

    from elise.data.shards import write_ipc

    done = folder / "done.json"
    if done.is_file() and json.loads(done.read_text()) == {"clips": clips, "seed": seed}:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.arrow"):
        old.unlink()
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 2048, 2**24, dtype=np.int16)  # codes are slices of one random pool
    words = np.array(WORDS)
    for start in range(0, clips, per_file):
        n = min(per_file, clips - start)
        seconds = np.clip(rng.lognormal(np.log(6.0), 0.5, n), 1.0, 20.0)
        frames = np.round(seconds * 12.5).astype(np.int64)  # [n]
        sizes = frames * 32
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        starts = rng.integers(0, len(pool) - int(sizes.max()), n)
        data = np.concatenate([pool[s : s + z] for s, z in zip(starts, sizes, strict=True)])
        codes = pa.Array.from_buffers(
            pa.binary(), n, [None, pa.py_buffer((offsets * 2).astype(np.int32)), pa.py_buffer(data)]
        )
        n_words = np.maximum(1, (seconds * 2.5).astype(int))
        texts = [" ".join(rng.choice(words, k)) + "." for k in n_words]
        table = pa.table(
            {
                "id": [f"clip{start + i:08d}" for i in range(n)],
                "text": texts,
                "speaker": [f"spk{k:03d}" for k in rng.integers(0, 500, n)],
                "codes": codes,
            }
        )
        write_ipc(folder / f"part-{start // per_file:05d}.arrow", table)
    done.write_text(json.dumps({"clips": clips, "seed": seed}))
    return folder


STARTUP = """
import json, resource, sys, time
t0 = time.perf_counter()
from elise.data.datamodule import EliseDataModule
data = {"source": "codes", "path": sys.argv[1], "cache_dir": sys.argv[2], "max_tokens": 5000,
        "max_samples": 16, "num_workers": 0, "pin_memory": False, "val_fraction": 0.001}
dm = EliseDataModule(data, None, seed=0)
t1 = time.perf_counter()
dm.prepare_data()
t2 = time.perf_counter()
dm.setup("fit")
t3 = time.perf_counter()
loader = dm.train_dataloader()
t4 = time.perf_counter()
batch = next(iter(loader))
t5 = time.perf_counter()
dm.train_sampler._epoch_batches(1)
t6 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "index_s": t2 - t1, "setup_s": t3 - t2, "sampler_s": t4 - t3,
                  "first_batch_s": t5 - t0, "epoch_plan_s": t6 - t5, "batch_rows": list(batch["tokens"].shape),
                  "train_clips": len(dm.train_set), "batches_per_epoch": len(loader),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_startup(clips: int = 1_000_000, folder: str | None = None) -> dict[str, Any]:
    """Training start-up from ``clips`` synthetic pre-encoded clips, each run in a fresh process:
    cold (the index is built) and warm (the index of the unchanged files is reused). The data stays
    in ``folder`` (default ``/tmp/elise_bench_codes_<clips>``), never in the repo."""
    src = synthetic_codes(Path(folder or f"/tmp/elise_bench_codes_{clips}"), clips)
    gen = json.loads((src / "done.json").read_text())
    size = sum(f.stat().st_size for f in src.glob("*.arrow"))
    out: dict[str, Any] = {"clips": gen["clips"], "data_gb": size / 1e9}
    with tempfile.TemporaryDirectory(prefix="elise_bench_") as cache:
        for run in ("cold", "warm"):
            proc = subprocess.run(
                [sys.executable, "-c", STARTUP, str(src), cache], capture_output=True, text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                return out | {"error": proc.stderr[-2000:]}
            out[run] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def bench_data(quick: bool = False) -> dict[str, Any]:
    return {
        "encode": bench_encode(
            clips=4 if quick else 8, seconds=2.0 if quick else 4.0, reps=1 if quick else 3
        ),
        "prepare": bench_prepare(reps=1 if quick else 3),
        "throughput": bench_prepare_throughput(clips=32 if quick else 128),
        "startup": bench_startup(100_000 if quick else 1_000_000),
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
    thr = res.get("throughput", {})
    for key, fig in thr.items():
        if isinstance(fig, dict):
            codec, workers, *stream = key.split("/")
            how = ", streamed from parquet" if stream else ""
            rows.append(
                {
                    "case": f"prepare {thr['clips']} clips{how}, {codec}, {workers} workers",
                    "clips/s": fig["clips_per_s"],
                    "s": fig["s"],
                }
            )
    up = res.get("startup", {})
    for run in ("cold", "warm"):
        if run in up:
            f = up[run]
            label = f"{up['clips']:,} pre-encoded clips, {run} start"
            rows.append({"case": f"{label}: index build", "s": f["index_s"]})
            rows.append(
                {"case": f"{label}: sampler planning (+1 epoch)", "s": f["sampler_s"] + f["epoch_plan_s"]}
            )
            rows.append(
                {
                    "case": f"{label}: first batch (from process start)",
                    "s": f["first_batch_s"],
                    "MB": f["peak_rss_mb"],
                }
            )
    return rows
