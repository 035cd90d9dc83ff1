"""Speech recognisers for the intelligibility metrics: ``load_asr(backend, model) -> ASR``.

Backends:
- ``whisper``: transformers ``WhisperForConditionalGeneration`` (default ``openai/whisper-large-v3``, the
  Seed-TTS-eval model; ``model=`` any Whisper hub id or local directory). Its WER is comparable with
  published figures (``comparable`` True for the default model).
- ``pocketsphinx``: CMU PocketSphinx with the US English model its package carries: offline, weak on
  synthetic and noisy speech; its figures only compare runs scored with it (``comparable`` False).
- ``auto``: Whisper when its weights load (local cache, or the hub when online), else pocketsphinx with a
  logged line saying its figures are not comparable with published ones.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from elise.data.audio import to_pcm16
from elise.evaluate.backends import RATE as ASR_RATE
from elise.evaluate.backends import (
    BackendUnavailable,
    from_pretrained,
    hub_or_offline,
    package_version,
    to_16k,
)

log = logging.getLogger("elise.evaluate")

DEFAULT_WHISPER = "openai/whisper-large-v3"
BACKENDS = ("auto", "whisper", "pocketsphinx")


class ASR(Protocol):
    """What every recogniser offers."""

    id: str  # model id and version, written into eval_report.json
    comparable: bool  # True: figures comparable with published (Seed-TTS-eval) ones

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str: ...


class Whisper:
    """A Whisper model through transformers, greedy decoding in English."""

    def __init__(self, model: str = DEFAULT_WHISPER, device: str = "cpu", local_only: bool = False):
        try:
            from transformers import WhisperForConditionalGeneration, WhisperProcessor
        except ImportError as err:
            raise BackendUnavailable(
                f"asr=whisper needs transformers (pip install 'elise[eval]'): {err}"
            ) from err
        self.processor, self.model = from_pretrained(
            "Whisper", model, local_only, WhisperProcessor, WhisperForConditionalGeneration
        )
        self.model.eval().to(device)
        self.device = device
        self.id = f"whisper:{model} (transformers {package_version('transformers')})"
        self.comparable = model == DEFAULT_WHISPER
        gen = self.model.generation_config
        # a multilingual checkpoint is told the language and task; English-only and test models are not
        self.generate_kwargs = (
            {"language": "en", "task": "transcribe"} if getattr(gen, "lang_to_id", None) else {}
        )

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        import torch

        wav = to_16k(audio, sample_rate)
        if wav.size == 0:
            return ""
        feats = self.processor(wav, sampling_rate=ASR_RATE, return_tensors="pt").input_features
        with torch.inference_mode():
            ids = self.model.generate(feats.to(self.device, self.model.dtype), **self.generate_kwargs)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


class PocketSphinx:
    """CMU PocketSphinx with its bundled US English acoustic model, dictionary and language model."""

    def __init__(self) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError as err:
            raise BackendUnavailable(
                f"asr=pocketsphinx needs pocketsphinx (pip install 'elise[eval]'): {err}"
            ) from err
        self.decoder = Decoder(samprate=ASR_RATE, loglevel="FATAL")
        self.id = f"pocketsphinx {package_version('pocketsphinx')} (en-us)"
        self.comparable = False

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        wav = to_16k(audio, sample_rate)
        pcm = to_pcm16(wav).tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""


def load_asr(backend: str = "auto", model: str | None = None, device: str = "cpu") -> ASR:
    """A recogniser by backend name (``BACKENDS``); ``model`` picks the Whisper id or local directory."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"asr={backend}: no such backend; choose one of: {', '.join(BACKENDS)}")
    if backend == "whisper":
        return Whisper(model or DEFAULT_WHISPER, device)
    if backend == "pocketsphinx":
        return PocketSphinx()
    name = model or DEFAULT_WHISPER

    def whisper(local_only: bool) -> ASR:
        return Whisper(name, device, local_only)

    def offline() -> ASR:
        return PocketSphinx()

    return hub_or_offline(
        "asr", name, whisper, offline,
        "pocketsphinx's WER/CER are NOT comparable with published (Whisper-large-v3) figures, only with "
        "other runs scored by it",
    )  # fmt: skip
