"""Speaker embeddings: the WavLM code path on a local random-weight model, and the offline encoder's
honesty (two clips of one voice are closer than clips of two voices, for several voices)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from evalkit import espeak, needs_espeak

from elise.data.audio import read_audio
from elise.evaluate.backends import BackendUnavailable
from elise.evaluate.speaker import Resemblyzer, WavLM, load_speaker_model, similarity


def test_wavlm_loads_a_local_directory_like_a_hub_id(tiny_wavlm: Path) -> None:
    model = load_speaker_model("wavlm", str(tiny_wavlm))
    assert isinstance(model, WavLM) and str(tiny_wavlm) in model.id
    rng = np.random.default_rng(0)
    a = model.embed(rng.normal(0, 0.1, 24_000).astype(np.float32), 24_000)
    assert a.shape == (12,) and np.isfinite(a).all()
    assert model.embed(np.zeros(10, np.float32), 16_000).shape == (12,)  # shorter than a window: padded
    assert isinstance(load_speaker_model("auto", str(tiny_wavlm)), WavLM)


def test_auto_falls_back_to_resemblyzer(tmp_path: Path) -> None:
    assert isinstance(load_speaker_model("auto", str(tmp_path / "absent")), Resemblyzer)
    with pytest.raises(BackendUnavailable, match="choose one of"):
        load_speaker_model("ecapa")


def test_similarity_is_the_cosine() -> None:
    assert similarity(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(1.0)
    assert similarity(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert similarity(np.zeros(2), np.array([1.0, 0.0])) == 0.0


@needs_espeak
def test_resemblyzer_same_voice_scores_above_different_voices(tmp_path: Path) -> None:
    model = load_speaker_model("resemblyzer")
    voices = ["en-us+m3", "en-us+f3", "en-gb+m1"]
    texts = ["The weather is lovely this morning.", "Please pass me the salt and pepper on the table."]
    emb = {
        (v, i): model.embed(read_audio(espeak(t, tmp_path / f"{v}{i}.wav", v), 16_000), 16_000)
        for v in voices
        for i, t in enumerate(texts)
    }
    for v in voices:
        same = similarity(emb[(v, 0)], emb[(v, 1)])
        for other in voices:
            if other != v:
                assert same > similarity(emb[(v, 0)], emb[(other, 1)]), (v, other)
    silent = model.embed(np.zeros(16_000, np.float32), 16_000)
    assert silent.shape == (256,)
