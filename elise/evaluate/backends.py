"""What the scoring backends share: their error, versions, 16 kHz input, transformers loading, and
``auto``'s choice between a hub model and the offline one whose package carries its weights."""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from elise.data.audio import resample, to_mono

log = logging.getLogger("elise.evaluate")

RATE = 16_000  # every backend takes 16 kHz
T = TypeVar("T")


class BackendUnavailable(RuntimeError):
    """A scoring backend's package or weights cannot be loaded."""


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def to_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Any float array (mono or [samples, channels]) at any rate -> float32 mono 16 kHz in [-1, 1]."""
    wav = to_mono(np.asarray(audio, dtype=np.float32))
    return np.clip(resample(wav, sample_rate, RATE), -1.0, 1.0).astype(np.float32)


def from_pretrained(what: str, model: str, local_only: bool, *classes: Any) -> list[Any]:
    """``cls.from_pretrained(model)`` of each of ``classes`` (transformers); one-line BackendUnavailable."""
    try:
        return [cls.from_pretrained(model, local_files_only=local_only) for cls in classes]
    except (OSError, ValueError) as err:
        raise BackendUnavailable(f"cannot load {what} model {model}: {' '.join(str(err).split())}") from err


def hub_or_offline(key: str, model: str, hub_model: Callable[[bool], T], offline: Callable[[], T],
                   not_comparable: str) -> T:  # fmt: skip
    """``auto``: ``hub_model(local_only)`` from the local cache, then from the hub when it answers a
    quick metadata call (an offline machine does not wait for the download's retries), else
    ``offline()`` with a warning that its figures are ``not_comparable``."""
    from elise import hub

    try:
        return hub_model(True)
    except BackendUnavailable as err:
        reason: str | None = str(err)
    if not Path(model).exists():  # a local directory that failed above will not load from the hub
        reason = hub.reachable(model)
        if reason is None:
            try:
                return hub_model(False)
            except BackendUnavailable as err:
                reason = str(err)
    log.warning("%s=auto: %s; using the offline backend: %s", key, reason, not_comparable)
    return offline()
