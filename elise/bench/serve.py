"""Serving load test: a real server (uvicorn + the batching worker) on the marvis_250m-sized random
model, N concurrent streaming clients, ``max_batch=16`` against ``max_batch=1`` in the same run.

Each client sends its requests one after the other (closed loop) and streams the pcm answer; every
request is cut at the same number of frames (``max_audio_seconds``: random heads never say EOS), so
all cases generate the same audio. Figures: audio seconds per wall second (all clients together),
p50/p95 time to the first byte and total latency, and where the model worker's time went while
the clients ran (``prefill_s``: admitted prompts, ``frame_s``: decode steps, ``decode_s``: the codec;
from ``/metrics``): the first byte waits for a prefill and a frame. The codec is ``tiny`` (decoding costs ~nothing):
the figures are the model's; Mimi's decoder adds its own time per chunk.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from elise.bench.synth import random_model
from elise.config import conf_defaults

FRAME_SECONDS = 0.08


def save_random(path: Path, preset: str = "marvis_250m") -> Path:
    """A checkpoint of the random model (random heads), as training writes them (bytes tokenizer)."""
    model = random_model(preset)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save(
        {"state_dict": state, "hyper_parameters": {"model": model.cfg.to_dict(), "tokenizer": "bytes"}}, path
    )
    return path


@contextmanager
def serving(ckpt: Path, overrides: list[str]) -> Iterator[str]:
    """A loaded, warm server on a free local port; yields its URL, stops it on exit."""
    import uvicorn

    from elise.serve.app import Server, app

    # the yaml's defaults + overrides (no Hydra compose: the bench already runs inside Hydra)
    cfg = OmegaConf.merge(
        conf_defaults("serve"), OmegaConf.from_dotlist([f"ckpt={ckpt}", "codec=tiny", *overrides])
    )
    assert isinstance(cfg, DictConfig)
    server = Server.from_config(cfg)
    server.warm_up()
    uv = uvicorn.Server(uvicorn.Config(app(server), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not (uv.started and uv.servers):
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(timeout=60)
        server.close()


def one_request(url: str, text: str, seed: int) -> tuple[float, float, int]:
    """(seconds to the first byte, total seconds, audio samples) of one streamed pcm request."""
    import httpx

    body = {"model": "elise", "input": text, "voice": "default", "response_format": "pcm", "seed": seed}
    t0 = time.perf_counter()
    first, size = None, 0
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=600) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes():
            if first is None:
                first = time.perf_counter() - t0
            size += len(chunk)
    return first or 0.0, time.perf_counter() - t0, size // 2


def worker_seconds(url: str) -> dict[str, float]:
    """The server's ``elise_worker_seconds`` by phase so far (``/metrics``)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=60).text
    found = re.findall(r'^elise_worker_seconds_total\{phase="(\w+)"\} (\S+)$', text, re.M)
    return {phase: float(value) for phase, value in found}


def load(url: str, clients: int, per_client: int, sample_rate: int = 24_000) -> dict[str, float]:
    """``clients`` threads, each sending ``per_client`` requests in turn; the aggregate figures."""
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            res = one_request(url, f"Client {c} says request number {r}.", seed=1000 * c + r)
            with lock:
                results.append(res)

    before = worker_seconds(url)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    phases = {f"{k}_s": round(v - before.get(k, 0.0), 4) for k, v in worker_seconds(url).items()}
    ttfb = sorted(r[0] for r in results)
    total = sorted(r[1] for r in results)
    audio = sum(r[2] for r in results) / sample_rate
    return {"clients": clients, "requests": len(results), "audio_s": round(audio, 2), "wall_s": round(wall, 2),
            "audio_s_per_s": round(audio / wall, 3), "ttfb_p50": round(statistics.median(ttfb), 3),
            "ttfb_p95": round(pct(ttfb, 0.95), 3), "latency_p50": round(statistics.median(total), 3),
            "latency_p95": round(pct(total, 0.95), 3), **phases}  # fmt: skip


def pct(sorted_xs: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of sorted values."""
    return sorted_xs[min(len(sorted_xs) - 1, max(0, round(q * len(sorted_xs)) - 1))]


def bench_serve(
    quick: bool, preset: str = "marvis_250m", clients: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """fp32 and int8, max_batch 16 and 1, at 1/4/8/16 clients (quick: int8 only, 1/4/8 clients, shorter
    requests)."""
    frames = 4 if quick else 10
    clients = clients or ((1, 4, 8) if quick else (1, 4, 8, 16))
    per_client = 1 if quick else 2
    cases = [("int8", "int8")] if quick else [("fp32", None), ("int8", "int8")]
    res: dict[str, Any] = {"frames_per_request": frames, "per_client": per_client, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_random(Path(tmp) / f"{preset}_random.ckpt", preset)
        for name, quantize in cases:
            for max_batch in (16, 1):
                overrides = [f"max_batch={max_batch}", f"max_audio_seconds={frames * FRAME_SECONDS}",
                             "max_positions=256", "log_level=warning", "split_sentences=false"]  # fmt: skip
                if quantize:
                    overrides.append(f"quantize={quantize}")
                with serving(ckpt, overrides) as url:
                    for n in clients:
                        row = {"case": name, "max_batch": max_batch, **load(url, n, per_client)}
                        res["rows"].append(row)
                        print(row, flush=True)
    by = {(r["case"], r["max_batch"], r["clients"]): r for r in res["rows"]}
    res["speedup"] = {
        f"{case} {n} clients": round(
            by[(case, 16, n)]["audio_s_per_s"] / by[(case, 1, n)]["audio_s_per_s"], 2
        )
        for case, _ in cases
        for n in clients
    }
    return res


def serve_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    by = {(r["case"], r["max_batch"], r["clients"]): r for r in res["rows"]}
    rows = []
    for r in res["rows"]:
        base = by.get((r["case"], 1, r["clients"]))
        speed = r["audio_s_per_s"] / base["audio_s_per_s"] if base and base["audio_s_per_s"] else None
        rows.append({**r, "vs max_batch=1": None if speed is None else round(speed, 2)})
    return rows
