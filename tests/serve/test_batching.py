"""Continuous batching: concurrent requests share decode steps and each gets its solo audio."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from tests.serve.test_speech import client

TEXTS = ["Hello there.", "A second voice, with commas.", "Short.", "Three sentences. Here they are. Done.",
         "Numbers like 42 and 7.", "Quotes \"inside\" the text.", "Another one!", "The last request."]  # fmt: skip


def speak(url: str, i: int) -> np.ndarray:
    resp = client(url).audio.speech.create(model="elise", voice="default", input=TEXTS[i], response_format="pcm",
                                           extra_body={"seed": 100 + i})  # fmt: skip
    return np.frombuffer(resp.content, dtype="<i2").astype(np.int32)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_eight_concurrent_requests_share_batches_and_equal_their_solo_audio(served):
    url, _ = served
    solo = [speak(url, i) for i in range(8)]
    assert metric(url, "elise_batch_size_max") == 1  # one at a time so far (warm-up included)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: speak(url, i), range(8)))
    assert metric(url, "elise_batch_size_max") >= 4  # the worker stepped them in shared batches
    for a, b in zip(solo, together, strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1  # same codes; decoding may round one LSB apart


def test_a_client_that_disconnects_frees_its_row(served):
    url, server = served
    text = " ".join(f"Sentence number {i} is here." for i in range(40))  # 40 pieces: long
    body = {"model": "elise", "input": text, "voice": "default", "response_format": "pcm", "seed": 1}
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=60) as r:
        next(r.iter_bytes())
        assert server.batcher.active() == 1
    deadline = time.time() + 30  # the worker sees the cancel at its next chunk boundary
    while server.batcher.active() and time.time() < deadline:
        time.sleep(0.05)
    assert server.batcher.active() == 0
    assert 'elise_requests_total{status="cancelled"}' in httpx.get(f"{url}/metrics").text
