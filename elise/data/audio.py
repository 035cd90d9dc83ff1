"""Audio decoding: any file or bytes soundfile reads (wav/flac/ogg/mp3), any rate and channel count
in; 24 kHz mono float32 out (soxr, high quality).

Decoding is done here and not by ``datasets`` (whose audio feature needs torchcodec/ffmpeg), so a
clip decodes the same way whichever source it came from.
"""

from __future__ import annotations

import io
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


def write_wav(path: str | Path, wav: np.ndarray, sr: int = TARGET_SR, subtype: str = "PCM_16") -> None:
    """Write mono float audio [N] (or [N, C]) as wav/flac (format from the suffix)."""
    sf.write(str(path), np.asarray(wav, dtype=np.float32), sr, subtype=subtype)
