"""``python synthesize.py`` as users run it: every user error exits with code 2 and exactly one stderr
line naming what and where (no traceback); a normal run writes its wav; text arguments need no quoting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
from testkit import save_tiny

ROOT = Path(__file__).resolve().parents[2]


def start(tmp: Path, *args: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(ROOT / "synthesize.py"),
        "codec=tiny",
        "device=cpu",
        f"hydra.run.dir={tmp}/hydra",
        *args,
    ]
    return subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_user_errors_exit_2_with_one_line(tmp_path):
    ckpt = save_tiny(tmp_path / "tiny.ckpt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "noise.wav").write_bytes(b"RIFF....WAVEjunkjunk" * 10)
    ok = [f"ckpt={ckpt}", "text=Hi"]
    cases = {  # name: (arguments, words the message must contain)
        "missing checkpoint": ([f"ckpt={tmp_path}/nope.ckpt", "text=Hi"], ["not found", "nope.ckpt"]),
        "not a checkpoint": ([f"ckpt={tmp_path}/notes.txt", "text=Hi"], ["notes.txt"]),
        "empty text": ([f"ckpt={ckpt}", "text=   "], ["text is empty"]),
        "no text": ([f"ckpt={ckpt}"], ["text="]),
        "missing text_file": ([f"ckpt={ckpt}", f"text_file={tmp_path}/none.txt"], ["none.txt"]),
        "unreadable reference": (
            [*ok, f"reference_audio={tmp_path}/noise.wav", "reference_text=Hi"],
            ["noise.wav"],
        ),
        "reference without text": ([*ok, f"reference_audio={tmp_path}/noise.wav"], ["reference_text"]),
        "unwritable output": ([*ok, f"output={tmp_path}/notes.txt/out.wav"], ["notes.txt/out.wav"]),
    }
    procs = {name: start(tmp_path, *args) for name, (args, _) in cases.items()}  # run side by side
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (name, err)
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        assert lines[0].startswith("error: ") and all(w in lines[0] for w in cases[name][1]), (name, lines[0])


@pytest.mark.slow  # a subprocess; test_cli's typed-text run guards the command in the fast tier
def test_cli_run_writes_wav_with_unquoted_text(tmp_path):
    ckpt = save_tiny(tmp_path / "tiny.ckpt")
    out = tmp_path / "o.wav"
    text = "Hello, world. Don't stop: a=b"
    proc = start(
        tmp_path, f"ckpt={ckpt}", f"text={text}", f"output={out}", "max_audio_seconds=0.16", "seed=1"
    )
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert sf.info(out).frames == 2 * 2 * 1920 + 3600  # two pieces of 2 frames + a 150 ms pause
    assert "RANDOM weights" in stdout + err and "o.wav: 0.47 s audio" in stdout + err
