"""``python serve.py``: a user error is one line (exit 2); the real command serves offline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    from elise.cli import main

    with pytest.raises(SystemExit) as exited:
        main("serve", [f"ckpt={tmp_path / 'nope.ckpt'}", "codec=tiny"])  # = python serve.py ...
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1 and "nope.ckpt" in err, err


@pytest.mark.slow
def test_serve_py_serves_the_api_and_page_offline(tiny_ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "serve.py"), f"ckpt={tiny_ckpt}", "codec=tiny", f"port={port}",
           "max_audio_seconds=0.5", "threads=1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.3)
        r = httpx.post(f"{url}/v1/audio/speech", json={"input": "Hi there.", "voice": "default",
                                                       "response_format": "wav"}, timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.content[:4] == b"RIFF"
        assert "Play" in httpx.get(url).text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
