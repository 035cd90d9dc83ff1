"""Property-based synthesis inputs: any text (empty, very long, control characters, mixed scripts,
emoji) and odd reference audio (very short, silent, stereo, odd rates) give a wav or a one-line
``SynthesisError`` / ``CheckpointError``, never a crash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig
from testkit import save_tiny

from elise.checkpoints import CheckpointError
from elise.config import compose
from elise.synthesis import SynthesisError
from elise.synthesize import run

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ODD = "\x00\x07\x1b\x7f\u200b\u200e\u202e\ufeff\u0301\t\r\n"  # controls, zero-width, bidi, BOM, combining
SCRIPTS = "aZ9 .,!?" + "éßñ" + "дЖ" + "中文字" + "ひら" + "العربية" + "עב" + "हिन्दी" + "😀🎉👍🏽" + ODD

texts = st.one_of(
    st.text(alphabet=SCRIPTS, max_size=60),
    st.text(max_size=40),  # anything hypothesis can produce (no surrogates)
    st.builds(
        lambda w, n: (w + " ") * n, st.sampled_from(["word.", "Long", "😀", "\x00"]), st.integers(50, 400)
    ),
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    yield save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")
    torch.set_num_threads(threads)  # run() applies threads=1 to the process


def config(ckpt: Path, out: Path, **values) -> DictConfig:
    cfg = compose("synthesize", ["codec=tiny"])
    base = {"ckpt": str(ckpt), "top_k": 1, "seed": 0, "max_audio_seconds": 0.16, "device": "cpu"}
    base.update(output=str(out), max_sentence_chars=400, threads=1)  # 1 thread: tiny model, busy CPU
    for key, value in {**base, **values}.items():
        cfg[key] = value
    return cfg


def check(cfg: DictConfig, out: Path) -> None:
    try:
        [m] = run(cfg)
    except (SynthesisError, CheckpointError) as err:
        assert str(err) and "\n" not in str(err)
        return
    info = sf.info(out)
    assert info.samplerate == 24_000 and info.frames == round(m["audio_seconds"] * 24_000)


@FAST
@given(text=texts)
def test_any_text_gives_audio_or_a_one_line_error(ckpt, tmp_path, text):
    out = tmp_path / "t.wav"
    check(config(ckpt, out, text=text), out)


@FAST
@given(
    samples=st.sampled_from([0, 1, 7, 100, 1919, 1920, 4000, 9000]),
    rate=st.sampled_from([8_000, 11_025, 16_000, 22_050, 24_000, 44_100, 48_000, 96_000, 1_234]),
    channels=st.integers(1, 3),
    silent=st.booleans(),
    text=st.sampled_from(["Hi.", "   ", "😀", "Hello there, friend."]),
)
def test_odd_reference_audio_gives_audio_or_a_one_line_error(
    ckpt, tmp_path, samples, rate, channels, silent, text
):
    ref = tmp_path / "ref.wav"
    wav = np.zeros((samples, channels), np.float32)
    if not silent:
        wav += 0.3 * np.random.default_rng(samples).standard_normal((samples, channels)).astype(np.float32)
    sf.write(ref, wav, rate)
    out = tmp_path / "r.wav"
    check(config(ckpt, out, text="Say this.", reference_audio=str(ref), reference_text=text), out)
