"""Scoring: stopping flags (a cut wav, a noise tail), DNSMOS on speech vs noise, voice matching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from evalkit import SAMPLE, espeak, needs_espeak

from elise.data.audio import read_audio
from elise.evaluate.score import Scorer, ends_in_silence
from elise.evaluate.sources import RATE, Item

TEXT = "The weather is lovely this morning."


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return read_audio(SAMPLE / "wavs" / "sample_001.flac", RATE)


def test_a_cut_wav_and_a_noise_tail_are_flagged(speech: np.ndarray) -> None:
    noise = np.random.default_rng(0).normal(0, 0.05, 5 * RATE).astype(np.float32)
    items = [Item("whole", TEXT, "w", speech), Item("half", TEXT, "h", speech[: speech.size // 2]),
             Item("tail", TEXT, "t", np.concatenate([speech, noise]))]  # fmt: skip
    report = Scorer(["eos", "duration_ratio"]).score(items)
    whole, half, tail = report["items"]
    assert whole["eos"] and whole["flags"] == [] and 0.7 < whole["duration_ratio"] < 1.3
    assert half["eos"] is False and "cut" in half["flags"] and half["duration_ratio"] < 0.6
    assert tail["eos"] is False and "long" in tail["flags"] and tail["duration_ratio"] > 1.8
    assert report["summary"]["counts"] == {"items": 3, "cut": 2, "long": 1, "empty_transcript": 0,
                                           "seconds": pytest.approx(sum(r["seconds"] for r in report["items"]), abs=0.02)}  # fmt: skip
    assert report["summary"]["eos_rate"]["mean"] == pytest.approx(1 / 3)


def test_engine_eos_wins_over_the_audio_guess(speech: np.ndarray) -> None:
    row = Scorer(["eos"]).score([Item("a", TEXT, "a", speech, eos=False)])["items"][0]
    assert row["eos"] is False and row["flags"] == ["cut"]
    assert not ends_in_silence(np.zeros(100, np.float32))


def test_dnsmos_rates_speech_above_noise(speech: np.ndarray) -> None:
    scorer = Scorer(["mos"], mos="dnsmos")
    noise = np.clip(np.random.default_rng(0).normal(0, 0.2, 3 * RATE), -1, 1).astype(np.float32)
    good, bad = scorer.score([Item("s", TEXT, "s", speech), Item("n", TEXT, "n", noise)])["items"]
    assert good["mos"] > bad["mos"] + 0.5 and good["mos_bak"] > bad["mos_bak"]
    assert "dnsmos" in scorer.backends["mos"]


@needs_espeak
def test_voice_match_matrix_finds_each_output_s_own_voice(tmp_path: Path) -> None:
    voices = ["en-us+m3", "en-us+f3", "en-gb+m1"]
    refs = [str(espeak("This is my voice, recorded for reference.", tmp_path / f"ref{i}.wav", v))
            for i, v in enumerate(voices)]  # fmt: skip
    items = [
        Item(
            f"{i}",
            TEXT,
            "x",
            read_audio(espeak(TEXT, tmp_path / f"out{i}.wav", v), RATE),
            reference=refs[i],
            voice=i,
        )
        for i, v in enumerate(voices)
    ]
    scorer = Scorer(["sim"], sim="resemblyzer")
    report = scorer.score(items)
    vm = report["voice_match"]
    assert vm["references"] == sorted(refs) and vm["n"] == 3
    assert vm["matched_share"] == 1.0 and all(r["matched"] for r in report["items"])
    matrix = np.array(vm["matrix"])  # [output voice, reference]
    assert (matrix.argmax(axis=1) == np.arange(3)).all()
    assert report["summary"]["sim"]["mean"] == pytest.approx(np.mean(np.diag(matrix)))
    assert "embedding" not in report["items"][0]
    # clips of one voice as per-line references (audio mode) are no voices to tell apart: no matrix
    assert (
        scorer.voice_match([{"reference": refs[0], "voice": None}, {"reference": refs[1], "voice": None}])
        is None
    )


def test_scoring_shows_its_progress_only_when_asked(speech: np.ndarray, capsys) -> None:
    items = [Item(str(i), TEXT, str(i), speech) for i in range(3)]
    Scorer(["eos"]).score(items)
    assert "score" not in capsys.readouterr().err
    Scorer(["eos"]).score(items, progress=True)
    err = capsys.readouterr().err
    assert "score: 100%" in err and "3/3" in err
