"""A 16-bit PCM mono wav writer that keeps the file valid after every append (streaming output).

The RIFF and data sizes in the header are rewritten after each chunk, so a player or
``soundfile.read`` opened mid-generation sees a well-formed file holding the audio so far.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from elise.synthesis.errors import SynthesisError, one_line

HEADER_BYTES = 44


def to_pcm16(wav: np.ndarray) -> np.ndarray:
    """Float audio [N] in [-1, 1] -> int16 [N] (clipped: random-weight codecs can exceed full scale)."""
    return np.round(np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2")


def _header(num_samples: int, sample_rate: int) -> bytes:
    data = 2 * num_samples
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + data, b"WAVE",
        b"fmt ", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16,  # PCM, mono, byte rate, block align, bits
        b"data", data,
    )  # fmt: skip


class WavWriter:
    """Append float audio to ``path`` as 16-bit PCM mono; the file is a valid wav after every ``append``."""

    def __init__(self, path: str | Path, sample_rate: int = 24_000):
        self.path, self.sample_rate, self.num_samples = Path(path), sample_rate, 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "wb")  # noqa: SIM115 - stays open across appends, closed in close()
            self._f.write(_header(0, sample_rate))
            self._f.flush()
        except OSError as err:
            raise SynthesisError(f"cannot write output {self.path}: {one_line(err)}") from err

    def append(self, wav: np.ndarray) -> None:
        """Append mono float samples [N] and rewrite the header sizes."""
        pcm = to_pcm16(np.asarray(wav).reshape(-1))
        self._f.seek(0, 2)
        self._f.write(pcm.tobytes())
        self.num_samples += pcm.size
        self._f.seek(0)
        self._f.write(_header(self.num_samples, self.sample_rate))
        self._f.flush()

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_writable(path: Path) -> None:
    """Fail early (before loading a model) when ``path`` cannot be created or written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with open(path, "ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as err:
        raise SynthesisError(f"cannot write output {path}: {one_line(err)}") from err
