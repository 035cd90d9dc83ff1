"""Audio in and out, the one place: decoding any file or bytes soundfile reads (wav/flac/ogg/mp3), any
rate and channel count in, 24 kHz mono float32 out (soxr, high quality); ``write_wav`` and the
streaming ``WavWriter`` (a 16-bit PCM wav that is valid after every append).

Decoding is done here and not by ``datasets`` (whose audio feature needs torchcodec/ffmpeg), so a
clip decodes the same way whichever source it came from.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from elise.errors import one_line

TARGET_SR = 24_000
# Names the decoding pipeline; it is part of every cached audio hash, so changing how audio is
# decoded or resampled (e.g. the soxr quality) must change this string to invalidate old entries.
PIPELINE = f"soundfile+soxr-HQ->{TARGET_SR}Hz-mono-f32-v1"


class AudioError(ValueError):
    """A clip that cannot be decoded (corrupt, unknown format, no frames)."""


def to_mono(wav: np.ndarray) -> np.ndarray:
    """[N] or [N, C] -> [N] (channel mean)."""
    if wav.ndim == 1:
        return wav
    if wav.ndim != 2:
        raise AudioError(f"expected [samples] or [samples, channels] audio, got shape {wav.shape}")
    return wav.mean(axis=1)  # [N]


def resample(wav: np.ndarray, sr: int, target_sr: int = TARGET_SR) -> np.ndarray:
    """Resample mono [N] float audio from ``sr`` to ``target_sr`` with soxr (HQ); float32 out."""
    wav = np.asarray(wav, dtype=np.float32)
    if sr == target_sr or wav.size == 0:
        return wav
    return soxr.resample(wav, sr, target_sr, quality="HQ").astype(np.float32, copy=False)  # [N']


class _NamedIO(io.BytesIO):
    """BytesIO whose repr (used in libsndfile's errors) is the name of the data, not an address."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __repr__(self) -> str:
        return self.label


def read_audio(src: str | Path | bytes, target_sr: int = TARGET_SR) -> np.ndarray:
    """Decode a path or encoded bytes to mono float32 [N] at ``target_sr``.

    Raises:
        FileNotFoundError: ``src`` is a path that does not exist.
        AudioError: the data cannot be decoded.
    """
    if isinstance(src, bytes | bytearray | memoryview):
        if len(src) == 0:
            raise AudioError("no audio bytes")
        handle: io.BytesIO | str = _NamedIO(bytes(src), getattr(src, "name", "audio bytes"))
    else:
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"audio file not found: {path}")
        handle = str(path)
    try:
        wav, sr = sf.read(handle, dtype="float32", always_2d=True)  # [N, C]
    except Exception as err:  # libsndfile raises several types (LibsndfileError, RuntimeError, TypeError)
        raise AudioError(f"cannot decode audio: {one_line(err)}") from err
    mono = to_mono(wav)  # [N]
    if not np.isfinite(mono).all():
        raise AudioError("audio has NaN or infinite samples")
    return resample(mono, int(sr), target_sr)  # [N'] float32


def to_pcm16(wav: np.ndarray) -> np.ndarray:
    """Float audio [N] in [-1, 1] -> int16 [N] (clipped: random-weight codecs can exceed full scale)."""
    return np.round(np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2")


def write_wav(path: str | Path, wav: np.ndarray, sr: int = TARGET_SR) -> None:
    """Write mono float audio [N]: ``.wav`` as 16-bit PCM (``WavWriter``), other suffixes (flac) by soundfile."""
    if Path(path).suffix.lower() != ".wav":
        sf.write(str(path), np.asarray(wav, dtype=np.float32), sr, subtype="PCM_16")
        return
    with WavWriter(path, sr) as writer:
        writer.append(wav)


def _header(num_samples: int, sample_rate: int) -> bytes:
    data = 2 * num_samples
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + data, b"WAVE",
        b"fmt ", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16,  # PCM, mono, byte rate, block align, bits
        b"data", data,
    )  # fmt: skip


class WavWriter:
    """Append float audio to ``path`` as 16-bit PCM mono; the file is a valid wav after every ``append``
    (the RIFF and data sizes are rewritten after each chunk). Raises OSError when it cannot write."""

    def __init__(self, path: str | Path, sample_rate: int = TARGET_SR):
        self.path, self.sample_rate, self.num_samples = Path(path), sample_rate, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "wb")  # noqa: SIM115 - stays open across appends, closed in close()
        self._f.write(_header(0, sample_rate))
        self._f.flush()

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
