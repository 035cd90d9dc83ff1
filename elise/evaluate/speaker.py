"""Speaker embeddings for voice similarity (SIM): ``load_speaker_model(backend, model) -> SpeakerModel``.

Backends:
- ``wavlm``: transformers ``WavLMForXVector`` (default ``microsoft/wavlm-base-plus-sv``; ``model=`` any
  x-vector checkpoint id or local directory). Seed-TTS-eval uses a WavLM-large verification model, so
  SIM from the default base model is close to, not the same as, published figures.
- ``resemblyzer``: the GE2E voice encoder whose weights its package carries (offline).
- ``auto``: WavLM when its weights load (local cache, or the hub when online), else resemblyzer.

``similarity(a, b)`` is the cosine of two embeddings.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from elise.evaluate.backends import (
    BackendUnavailable,
    from_pretrained,
    hub_or_offline,
    package_version,
    to_16k,
)

log = logging.getLogger("elise.evaluate")

DEFAULT_WAVLM = "microsoft/wavlm-base-plus-sv"
BACKENDS = ("auto", "wavlm", "resemblyzer")


class SpeakerModel(Protocol):
    """What every speaker-embedding model offers."""

    id: str  # model id and version, written into eval_report.json

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray: ...


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (0 when either is all zeros)."""
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norm) if norm > 0 else 0.0


class WavLM:
    """``WavLMForXVector`` embeddings (its x-vector head's output)."""

    def __init__(self, model: str = DEFAULT_WAVLM, device: str = "cpu", local_only: bool = False):
        try:
            from transformers import AutoFeatureExtractor, WavLMForXVector
        except ImportError as err:
            raise BackendUnavailable(
                f"sim=wavlm needs transformers (pip install 'elise[eval]'): {err}"
            ) from err
        self.extractor, self.model = from_pretrained(
            "WavLM", model, local_only, AutoFeatureExtractor, WavLMForXVector
        )
        self.model.eval().to(device)
        self.device = device
        self.id = f"wavlm:{model} (transformers {package_version('transformers')})"

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        import torch

        wav = to_16k(audio, sample_rate)
        if wav.size < 400:  # shorter than one analysis window: nothing to embed
            wav = np.pad(wav, (0, 400 - wav.size))
        inputs = self.extractor(wav, sampling_rate=16_000, return_tensors="pt")
        with torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        return out.embeddings[0].float().cpu().numpy()  # [xvector_output_dim]


class Resemblyzer:
    """Resemblyzer's GE2E voice encoder (256-dim, unit-norm embeddings)."""

    def __init__(self, device: str = "cpu"):
        try:
            from resemblyzer import VoiceEncoder, preprocess_wav
        except ImportError as err:
            raise BackendUnavailable(
                f"sim=resemblyzer needs resemblyzer (see the eval extra): {err}"
            ) from err
        self.encoder = VoiceEncoder(device=device, verbose=False)
        self.preprocess = preprocess_wav
        self.id = f"resemblyzer {package_version('resemblyzer')} (GE2E)"

    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        wav = to_16k(audio, sample_rate)
        if wav.size == 0 or float(np.abs(wav).max()) < 1e-4:  # silence: no voice to embed
            return np.zeros(256, dtype=np.float32)
        wav = self.preprocess(wav, 16_000)  # trims long silences, normalises volume
        if wav.size < 1_600:  # under 0.1 s of speech left: too short to frame
            return np.zeros(256, dtype=np.float32)
        return np.asarray(self.encoder.embed_utterance(wav), dtype=np.float32)  # [256]


def load_speaker_model(backend: str = "auto", model: str | None = None, device: str = "cpu") -> SpeakerModel:
    """A speaker-embedding model by backend name (``BACKENDS``); ``model`` picks the WavLM id or directory."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"sim={backend}: no such backend; choose one of: {', '.join(BACKENDS)}")
    if backend == "wavlm":
        return WavLM(model or DEFAULT_WAVLM, device)
    if backend == "resemblyzer":
        return Resemblyzer(device)
    name = model or DEFAULT_WAVLM

    def wavlm(local_only: bool) -> SpeakerModel:
        return WavLM(name, device, local_only)

    def offline() -> SpeakerModel:
        return Resemblyzer(device)

    return hub_or_offline(
        "sim", name, wavlm, offline,
        "resemblyzer's SIM is not comparable with published (WavLM) figures",
    )  # fmt: skip
