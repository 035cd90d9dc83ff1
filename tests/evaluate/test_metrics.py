"""Normalised WER/CER and the expected duration."""

from __future__ import annotations

import pytest

from elise.evaluate.metrics import cer, duration_ratio, edit_distance, expected_seconds, normalise, wer


def test_normalisation_makes_spoken_and_written_forms_equal() -> None:
    assert wer("It's 3 o'clock, Dr. Smith.", "it is three o'clock doctor smith") == 0.0
    assert cer("It's 3 o'clock, Dr. Smith.", "it is three o'clock doctor smith") == 0.0
    assert normalise("I can't believe it! <laughs>") == "i can not believe it"


def test_british_and_american_spellings_are_the_same_words() -> None:
    """Whisper's spelling map (shipped: no hub): a British text read back by a US recogniser is no error."""
    import json

    from elise.evaluate.metrics import SPELLING

    assert wer("The colour of the theatre's organisers.", "the color of the theater's organizers") == 0.0
    assert normalise("Apologised, catalogue, grey") == "apologized catalog gray"
    assert len(json.loads(SPELLING.read_text())) == 1739  # the whole map, as Whisper ships it
    assert "english_spelling.json" in (SPELLING.parent / "english_spelling.NOTICE.md").read_text()


def test_error_rates_count_edits_over_the_reference() -> None:
    assert edit_distance("kitten", "sitting") == 3
    assert wer("the cat sat on the mat", "the cat sat on mat") == pytest.approx(1 / 6)
    assert wer("a b", "a b c d") == pytest.approx(1.0)  # insertions count: WER can pass 1
    assert wer("hello there", "") == 1.0
    assert wer("", "") == 0.0 and wer("", "words") == 1.0


def test_duration_ratio_flags_cuts_and_tails() -> None:
    text = "We walked along the river until sunset."
    normal = expected_seconds(text)
    assert duration_ratio(text, normal) == pytest.approx(1.0)
    assert duration_ratio(text, normal / 2) == pytest.approx(0.5)
    assert expected_seconds("Well, <laughs> fine.") == expected_seconds("Well, fine.")
