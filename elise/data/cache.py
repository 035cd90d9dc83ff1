"""On-disk caches of preparation: codes per clip, and the decoded-audio facts per source file.

Codes: one ``<key>.npy`` int16 [num_codebooks, T] per clip, where the key hashes the decoded
24 kHz audio, the codec identity and the settings that change codes. Files are written to a
temporary name and renamed (``os.replace`` is atomic), so a killed run leaves either a whole file
or none: the existence of the file is the only resume state, and it cannot go stale.

Audio index: decoding and resampling every clip again just to find it in the cache is most of a
rerun's time, so ``audio_index.jsonl`` remembers, per source file (path + size + mtime, or the hash
of encoded bytes), the hash, length and peak of its decoded audio. It is append-only; a line cut by
a kill is ignored, and a changed file has a new size/mtime and so a new entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from elise.data.audio import PIPELINE, AudioError, read_audio
from elise.errors import one_line

CACHE_VERSION = "codes-v1"


@dataclass(frozen=True)
class AudioInfo:
    """Facts about one decoded clip: sha256 of its float32 samples, sample count, peak |x|."""

    sha: str
    num_samples: int
    peak: float


def audio_info(wav: np.ndarray) -> AudioInfo:
    """Hash, length and peak of mono float32 audio [N]."""
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    peak = float(np.abs(wav).max()) if wav.size else 0.0
    return AudioInfo(hashlib.sha256(wav.tobytes()).hexdigest(), int(wav.size), peak)


def decode_job(job: Path | tuple[bytes, str]) -> tuple[np.ndarray, AudioInfo] | tuple[str, str]:
    """Decode (and resample) one clip; runs in a preparation worker process.

    ``job``: a path, or (encoded bytes, their name). Returns (wav [N] float32 24 kHz, its
    ``AudioInfo``), or (reason, detail) of an ``unreadable_audio`` skip, so a bad clip never
    ends the pool.
    """
    try:
        if isinstance(job, tuple):
            from elise.data.sources import NamedBytes

            wav = read_audio(NamedBytes(job[0], job[1]))
        else:
            wav = read_audio(job)
        return wav, audio_info(wav)
    except (AudioError, OSError) as err:
        return "unreadable_audio", one_line(err)
    except Exception as err:  # a per-item failure must not end a long run; it is reported instead
        return "unreadable_audio", f"{type(err).__name__}: {one_line(err)}"


def source_fingerprint(src: Path | bytes) -> str:
    """Identity of an encoded source: hash of its bytes, or resolved path + size + mtime (ns)."""
    if isinstance(src, bytes | bytearray | memoryview):
        return f"bytes:{hashlib.sha256(src).hexdigest()}|{PIPELINE}"
    st = os.stat(src)
    return f"path:{Path(src).resolve()}|{st.st_size}|{st.st_mtime_ns}|{PIPELINE}"


class AudioIndex:
    """Append-only map source fingerprint -> ``AudioInfo`` (``audio_index.jsonl``)."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, AudioInfo] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    self._entries[row["fp"]] = AudioInfo(str(row["sha"]), int(row["n"]), float(row["peak"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill, or from another version

    def get(self, fingerprint: str) -> AudioInfo | None:
        return self._entries.get(fingerprint)

    def add(self, fingerprint: str, info: AudioInfo) -> None:
        if self._entries.get(fingerprint) == info:
            return
        self._entries[fingerprint] = info
        row = {"fp": fingerprint, **asdict(info)}
        row["n"] = row.pop("num_samples")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def __len__(self) -> int:
        return len(self._entries)


class CodeCache:
    """Content-addressed store of code arrays under ``root`` (``root/<key[:2]>/<key>.npy``)."""

    def __init__(self, root: str | Path, codec_identity: str, settings: str = ""):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.codec_identity = codec_identity
        self.settings = settings
        self.audio_index = AudioIndex(self.root / "audio_index.jsonl")

    def key(self, audio_sha: str) -> str:
        """Cache key of a clip's codes: its audio hash + codec identity + settings."""
        text = f"{CACHE_VERSION}|{audio_sha}|{self.codec_identity}|{self.settings}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def frames(self, key: str, num_codebooks: int) -> int | None:
        """Frame count of a cached entry, or None when missing or unusable (then it is re-encoded)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            arr = np.load(path, mmap_mode="r")  # reads the header only
        except (OSError, ValueError):
            return None
        if arr.dtype != np.int16 or arr.ndim != 2 or arr.shape[0] != num_codebooks:
            return None
        return int(arr.shape[1])

    def save(self, key: str, codes: np.ndarray) -> Path:
        """Write codes [K, T] as int16, atomically; returns the final path."""
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(np.int16).max):
            raise ValueError(f"codes out of int16 range: [{codes.min()}, {codes.max()}]")
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, codes.astype(np.int16))
        os.replace(tmp, path)
        return path
