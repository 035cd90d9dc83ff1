"""Stored voices: a voice prompt encoded once and kept as two files in a folder, ``<name>.json``
(transcript, speaker, codec identity, frames) and ``<name>.npy`` (int16 codes [32, T], read with
``allow_pickle=False``: nothing is unpickled). The server writes them (``POST /v1/audio/voices``) and
both the server and ``synthesize.py voices=<folder>`` read them, through this module only.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from elise.synthesis.errors import SynthesisError, one_line


@dataclass
class StoredVoice:
    text: str
    speaker: int | str
    codec: str  # the identity of the codec that made ``codes``
    codes: Tensor  # [32, T] long


def stored_paths(folder: Path, name: str) -> tuple[Path, Path]:
    """The (metadata, codes) files of voice ``name`` in ``folder``."""
    return folder / f"{name}.json", folder / f"{name}.npy"


def is_stored(folder: Path, name: str) -> bool:
    return all(p.is_file() for p in stored_paths(folder, name))


def read_stored(folder: Path, name: str) -> StoredVoice:
    """Voice ``name`` of ``folder``; SynthesisError (one line) when its files are missing or unreadable."""
    meta_path, codes_path = stored_paths(folder, name)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        codes = np.load(codes_path, allow_pickle=False)  # [32, T], nothing unpickled
        if codes.ndim != 2:
            raise ValueError(f"codes of shape {list(codes.shape)}, not [codebooks, frames]")
        return StoredVoice(
            str(meta["text"]),
            meta["speaker"],
            str(meta.get("codec")),
            torch.from_numpy(codes.astype(np.int64)),
        )
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise SynthesisError(f"cannot read voice {name!r} in {folder}: {one_line(err)}") from err


def write_stored(folder: Path, name: str, voice: StoredVoice) -> None:
    """Keep ``voice`` as ``name`` in ``folder``: each file written whole (a temporary file, then renamed),
    the codes first, so a reader never sees a half-written file or metadata without its codes."""
    meta = {
        "text": voice.text,
        "speaker": voice.speaker,
        "codec": voice.codec,
        "frames": int(voice.codes.shape[1]),
    }
    meta_path, codes_path = stored_paths(folder, name)
    for path, write in ((codes_path, lambda f: np.save(f, voice.codes.numpy().astype(np.int16), allow_pickle=False)),
                        (meta_path, lambda f: f.write(json.dumps(meta).encode()))):  # fmt: skip
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", delete=False) as tmp:
            try:
                write(tmp)
            except BaseException:  # a full disk: no half-written temporary file left in the folder
                tmp.close()
                os.unlink(tmp.name)
                raise
        os.replace(tmp.name, path)


def delete_stored(folder: Path, name: str) -> None:
    for path in stored_paths(folder, name):
        path.unlink(missing_ok=True)
