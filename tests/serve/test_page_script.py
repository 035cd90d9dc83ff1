"""The page's conversation controls, run in node (no browser needed) against the session's server: the
script, seed and overlap go to POST /v1/audio/dialogue; the page shows the audio and the timeline."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import soundfile as sf

HARNESS = Path(__file__).with_name("page_harness.js")


def run_page(url: str, values: dict[str, str], fn: str) -> dict:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("no node: the page's script is not run (make test-browser runs it in Chromium)")
    page = resources.files("elise.serve").joinpath("static/index.html")
    out = subprocess.run([node, str(HARNESS), str(page), url, json.dumps(values), fn], capture_output=True,
                         text=True, timeout=120, check=True)  # fmt: skip
    return json.loads(out.stdout)


def test_the_page_plays_a_conversation_and_shows_its_timeline(served):
    url, _ = served
    values = {"script": "0: Hello there.\n1: Hi, how are you?", "dseed": "5", "dpause": "", "doverlap": "200"}
    state = run_page(url, values, "talk")
    assert state["dstats"]["text"].startswith("2 turns, 1.88 s of audio"), state["dstats"]
    rows = [[str(c) for c in r] for r in state["timeline"]["rows"]]  # turn, speaker, start, end, text
    assert [r[:2] + r[4:] for r in rows] == [["1", "0", "Hello there."], ["2", "1", "Hi, how are you?"]]
    assert float(rows[1][2]) == pytest.approx(float(rows[0][3]) - 0.2, abs=0.011)  # starts 200 ms early
    wav, sr = sf.read(io.BytesIO(base64.b64decode(state["blobs"][0])))
    assert sr == 24_000 and wav.size == round(1.88 * sr)  # 2 turns of 13 frames, 200 ms overlapped


def test_the_page_shows_a_bad_script_as_one_error_line(served):
    url, _ = served
    state = run_page(url, {"script": "no colon here", "dseed": "", "dpause": "", "doverlap": "0"}, "talk")
    assert state["dstats"]["text"].startswith("error: script line 1: no colon")
