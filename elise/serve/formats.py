"""Response formats: float audio -> wav, pcm (s16le), flac, mp3, opus bytes, through soundfile/libsndfile.

``wav`` and ``pcm`` stream: a wav header with unknown length (0xFFFFFFFF sizes, as streaming servers
write it) then 16-bit samples as they come. ``flac``, ``mp3`` and ``opus`` are encoded once the audio is
complete (their encoders rewrite headers at the end), and sent in one piece.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

# format -> (soundfile format, subtype, media type)
FORMATS = {
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "pcm": ("RAW", "PCM_16", "audio/pcm"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    "opus": ("OGG", "OPUS", "audio/ogg"),
}
STREAMING = ("wav", "pcm")  # sent as they are generated; the others when complete


def media_type(fmt: str) -> str:
    return FORMATS[fmt][2]


def pcm16(audio: np.ndarray) -> bytes:
    """float32 [N] in [-1, 1] -> little-endian int16 bytes."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_header(sample_rate: int, num_samples: int | None = None) -> bytes:
    """A 44-byte PCM16 mono wav header; ``num_samples`` None: unknown length (streaming)."""
    data = 0xFFFFFFFF if num_samples is None else 2 * num_samples
    riff = 0xFFFFFFFF if num_samples is None else 36 + data
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
    return struct.pack("<4sI4s", b"RIFF", riff, b"WAVE") + fmt + struct.pack("<4sI", b"data", data)


def encode(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """The whole clip float32 [N] as ``fmt`` bytes."""
    if fmt == "pcm":
        return pcm16(audio)
    if fmt == "wav":
        return wav_header(sample_rate, audio.size) + pcm16(audio)
    container, subtype, _ = FORMATS[fmt]
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


class StreamEncoder:
    """Chunks float32 [n] -> bytes to send now; ``close`` -> the bytes left (the whole file for
    the formats that do not stream)."""

    def __init__(self, fmt: str, sample_rate: int):
        self.fmt, self.sample_rate = fmt, sample_rate
        self.started = False
        self.held: list[np.ndarray] = []

    def write(self, audio: np.ndarray) -> bytes:
        if self.fmt not in STREAMING:
            self.held.append(audio)
            return b""
        head = b""
        if not self.started and self.fmt == "wav":
            head = wav_header(self.sample_rate)
        self.started = True
        return head + pcm16(audio)

    def close(self) -> bytes:
        if self.fmt in STREAMING:
            return b"" if self.started or self.fmt == "pcm" else wav_header(self.sample_rate, 0)
        audio = np.concatenate(self.held) if self.held else np.zeros(0, dtype=np.float32)
        return encode(audio, self.sample_rate, self.fmt)
