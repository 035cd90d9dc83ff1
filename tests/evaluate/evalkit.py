"""Plain helpers of the evaluation tests (imported as ``from evalkit import ...``): the bundled sample
clips with their texts, and espeak-ng speech made at test time."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from elise.data.audio import read_audio

SAMPLE = Path(__file__).resolve().parents[2] / "elise" / "assets" / "sample"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def sample_clips(n: int) -> list[tuple[np.ndarray, str]]:
    """The first ``n`` bundled sample clips (16 kHz) with their texts."""
    rows = [line.split("|", 1) for line in (SAMPLE / "metadata.csv").read_text().splitlines() if line]
    return [(read_audio(SAMPLE / "wavs" / f"{key}.flac", 16_000), text) for key, text in rows[:n]]


def espeak(text: str, path: Path, voice: str = "en-us", speed: int = 160) -> Path:
    """``text`` spoken by espeak-ng voice ``voice`` into ``path`` (a wav)."""
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True)
    return path
