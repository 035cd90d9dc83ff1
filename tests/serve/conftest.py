"""A real server (uvicorn on a free port, in a thread of the test process) on the tiny checkpoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from elise.config import compose

# pieces stop at 1 s (the tiny model's random heads never say EOS): every request is quick
FAST = ["codec=tiny", "max_audio_seconds=1.0", "threads=1", "log_level=warning"]


@contextmanager
def running_server(ckpt: Path, overrides: list[str]) -> Iterator[tuple[str, object]]:
    """Start ``python serve.py ckpt=<ckpt> <overrides>``'s server in a thread; yields (base url, Server);
    stops it (and its model worker) on exit."""
    import uvicorn

    from elise.serve.app import Server, app

    cfg = compose("serve", [f"ckpt={ckpt}", *FAST, *overrides])
    server = Server.from_config(cfg)
    server.warm_up()
    uv = uvicorn.Server(uvicorn.Config(app(server), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not (uv.started and uv.servers):
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = uv.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(f"{url}/health").status_code == 200
        yield url, server
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        server.close()


@pytest.fixture(scope="session")
def served(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    """One server for the session (tests that change a limit restore it): max_batch=8, voices in a temp
    folder, no API key."""
    voices = tmp_path_factory.mktemp("voices")
    with running_server(tiny_ckpt, ["max_batch=8", f"voices_dir={voices}"]) as s:
        yield s
