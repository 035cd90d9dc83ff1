"""Recognisers: the Whisper code path on a local random-weight model, the offline fallback, and the
offline recogniser's honesty (real speech scores better than noise and silence)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from evalkit import sample_clips

from elise.evaluate.asr import PocketSphinx, Whisper, load_asr
from elise.evaluate.backends import BackendUnavailable
from elise.evaluate.metrics import cer, wer


def test_whisper_loads_a_local_directory_like_a_hub_id(tiny_whisper: Path) -> None:
    asr = load_asr("whisper", str(tiny_whisper))
    assert isinstance(asr, Whisper)
    assert str(tiny_whisper) in asr.id and "transformers" in asr.id
    assert asr.comparable is False  # only the default large-v3 is comparable with published WER
    noise = np.random.default_rng(0).normal(0, 0.1, 24_000).astype(np.float32)
    text = asr.transcribe(noise, 24_000)  # any rate in: resampled to 16 kHz
    assert isinstance(text, str)
    assert asr.transcribe(np.zeros(0, np.float32), 16_000) == ""


def test_auto_uses_whisper_when_its_weights_are_local(tiny_whisper: Path) -> None:
    assert isinstance(load_asr("auto", str(tiny_whisper)), Whisper)


def test_auto_falls_back_to_pocketsphinx_with_a_logged_line(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="elise.evaluate"):
        asr = load_asr("auto", str(tmp_path / "no_such_model"))
    assert isinstance(asr, PocketSphinx) and asr.comparable is False
    assert "pocketsphinx" in asr.id and "NOT comparable" in caplog.text


def test_unknown_backend_and_missing_model_are_errors(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="choose one of"):
        load_asr("kaldi")
    with pytest.raises(BackendUnavailable, match="cannot load Whisper"):
        load_asr("whisper", str(tmp_path / "absent"))


def test_pocketsphinx_scores_real_speech_better_than_noise_and_silence() -> None:
    asr = load_asr("pocketsphinx")
    clips = sample_clips(3)  # espeak-ng en-us speech with its text
    rng = np.random.default_rng(0)
    junk = [
        rng.normal(0, 0.1, 32_000).astype(np.float32),
        np.zeros(32_000, np.float32),
        rng.normal(0, 0.05, 32_000).astype(
            np.float32
        ),  # (loud uniform noise makes its search crawl: minutes)
    ]

    def scores(pairs: list[tuple[np.ndarray, str]]) -> np.ndarray:
        heard = [(text, asr.transcribe(audio, 16_000)) for audio, text in pairs]
        return np.mean([(wer(t, h), cer(t, h)) for t, h in heard], axis=0)  # [wer, cer]

    speech_wer, speech_cer = scores(clips)
    junk_wer, junk_cer = scores([(x, t) for x, (_, t) in zip(junk, clips, strict=True)])
    assert junk_wer >= 0.95 and junk_cer >= 0.9
    assert speech_wer < junk_wer
    assert speech_cer < junk_cer - 0.2  # CER separates them clearly
