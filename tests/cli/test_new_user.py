"""A new user's first tour, the README's commands in order on a temp dir: each exits as promised,
writes what it says and never shows a traceback (issue "What a new user hits")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_readme_tour(tmp_path, code_cache):
    def run(*args: str, code: int | None = 0) -> subprocess.CompletedProcess:
        cmd = [sys.executable, *args]
        if args[0].endswith(".py"):
            cmd[1] = str(ROOT / args[0])
        env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's elise, whatever is installed
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert code is None or done.returncode == code, (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (args, done.stderr[-2000:])
        if code == 2:
            assert len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
        return done

    cache = f"paths.cache_dir={code_cache}"
    assert "trainer.max_steps=" in run("train.py", "--help").stdout
    trained = run(
        "train.py",
        "experiment=demo",
        "threads=1",
        cache,
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
    )
    [run_dir] = (tmp_path / "outputs" / "train" / "runs").iterdir()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and f"synthesize: python synthesize.py ckpt={ckpt}" in trained.stdout

    wav = tmp_path / "hi (1), it's.wav"
    said = ['text="Hi," she said.', "max_audio_seconds=0.5", "seed=1", "device=cpu"]
    run("synthesize.py", f"ckpt={ckpt}", *said, f"output={wav}", "codec=tiny")
    assert sf.info(wav).frames > 0
    # the README's line names no codec: the checkpoint's own (tiny) must be used
    own_codec = run("synthesize.py", f"ckpt={ckpt}", *said, "output=own.wav", code=None)

    assert Path(run("-m", "elise.report", f"run_dir={run_dir}").stdout.strip()).is_file()
    run("-m", "elise.export", f"ckpt={ckpt}", "out=exported")
    assert (tmp_path / "exported" / "config.json").is_file()
    run("-m", "elise.prepare", "data=sample", "codec=tiny", cache)
    assert '"total"' in run("-m", "elise.model", "model=tiny").stdout
    for args in (
        ["synthesize.py", "--help"],
        ["-m", "elise.export", "--help"],
        ["-m", "elise.report", "--help"],
    ):
        assert "keys:" in run(*args).stdout

    # wrong commands: one line, exit 2
    run("synthesize.py", "tex=hi", code=2)
    run("train.py", "optim.lr=-1", code=2)
    run("train.py", "trainer.max_step=5", code=2)
    run("-m", "elise.model", "model=nope", code=2)
    run("synthesize.py", f"ckpt={tmp_path}/nope.ckpt", "text=Hi", code=2)
    run("-m", "elise.report", code=2)  # run_dir missing
    assert own_codec.returncode == 0, own_codec.stderr[-2000:]  # the checkpoint's recorded codec
    assert sf.info(tmp_path / "own.wav").frames > 0
