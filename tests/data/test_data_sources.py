"""Audio decoding and the data sources (ljspeech, manifest, elise parquet/save_to_disk/hub, sample)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from testkit import tone

from elise.data.audio import TARGET_SR, AudioError, read_audio, resample
from elise.data.load import load_items
from elise.data.sources import (
    DataUnavailable,
    read_hf,
    read_ljspeech,
    read_manifest,
    sample_root,
    speaker_map,
)


def encoded(wav: np.ndarray, sr: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format=fmt)
    return buf.getvalue()


# --- audio --------------------------------------------------------------------------------------


def test_8k_mono_is_resampled_to_24k(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, tone(1.0, 8000), 8000)
    wav = read_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert len(wav) == 24_000
    # a 440 Hz tone keeps its frequency and level: the spectrum peaks at 440 Hz, RMS stays 0.5/sqrt(2)
    spectrum = np.abs(np.fft.rfft(wav))
    assert np.argmax(spectrum) * TARGET_SR / len(wav) == pytest.approx(440, abs=2)
    assert np.sqrt(np.mean(wav[2000:-2000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_44k_stereo_is_downmixed_and_resampled(tmp_path: Path) -> None:
    path = tmp_path / "b.flac"
    sf.write(path, tone(0.5, 44_100, channels=2), 44_100)  # left = tone, right = silence
    wav = read_audio(path)
    assert wav.shape == (12_000,)
    # mono = channel mean: half the left channel's RMS
    assert np.sqrt(np.mean(wav[1000:-1000] ** 2)) == pytest.approx(0.25 / np.sqrt(2), rel=0.02)


@pytest.mark.parametrize(("fmt", "exact"), [("WAV", True), ("FLAC", True), ("OGG", False), ("MP3", False)])
def test_bytes_of_every_format_decode(fmt: str, exact: bool) -> None:
    wav = read_audio(encoded(tone(1.0, 16_000, channels=2), 16_000, fmt))
    assert wav.dtype == np.float32 and wav.ndim == 1
    if exact:
        assert len(wav) == 24_000
    else:  # lossy codecs add encoder delay / padding
        assert abs(len(wav) - 24_000) < 4000


def test_24k_passes_through_unchanged() -> None:
    wav = tone(0.2, TARGET_SR)
    np.testing.assert_array_equal(resample(wav, TARGET_SR), wav)


def test_corrupt_and_missing_audio_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="cannot decode"):
        read_audio(b"RIFF\x00\x00garbage" * 10)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(AudioError):
        read_audio(bad)
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        read_audio(tmp_path / "nope.wav")


# --- ljspeech / sample --------------------------------------------------------------------------


def write_lj(root: Path, lines: list[str], ids: list[str], suffix: str = ".wav") -> Path:
    (root / "wavs").mkdir(parents=True, exist_ok=True)
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for i in ids:
        sf.write(root / "wavs" / f"{i}{suffix}", tone(0.6, 16_000), 16_000)
    return root


def test_ljspeech_two_columns(tmp_path: Path) -> None:
    write_lj(tmp_path, ["a|Hello there. <laughs>", "b|Second line."], ["a", "b"])
    items = read_ljspeech(tmp_path)
    assert [(i.id, i.text, i.speaker) for i in items] == [
        ("a", "Hello there. <laughs>", None),
        ("b", "Second line.", None),
    ]
    assert items[0].audio == tmp_path / "wavs" / "a.wav"


def test_ljspeech_speaker_column_auto_detects_both_layouts(tmp_path: Path) -> None:
    spk = write_lj(tmp_path / "spk", ["a|bob|Hi there.", "b|alice|Good day."], ["a", "b"])
    assert [(i.speaker, i.text) for i in read_ljspeech(spk)] == [("bob", "Hi there."), ("alice", "Good day.")]
    # LJSpeech's own id|text|normalized_text: the 2nd column has spaces -> text; normalized text used
    lj = write_lj(tmp_path / "lj", ["LJ1|Dr. Smith paid 5 dollars.|Doctor Smith paid five dollars."], ["LJ1"])
    (item,) = read_ljspeech(lj)
    assert (item.speaker, item.text) == (None, "Doctor Smith paid five dollars.")
    # forced: speaker_column=true reads a 2nd column with spaces as a speaker
    (forced,) = read_ljspeech(lj, speaker_column=True)
    assert forced.speaker == "Dr. Smith paid 5 dollars."
    plain = read_ljspeech(spk, speaker_column="false")[0]
    assert plain.speaker is None and plain.text == "Hi there."  # 3rd column = normalized text


def test_ljspeech_flac_fallback_missing_and_bad_lines(tmp_path: Path) -> None:
    write_lj(tmp_path, ["a|One.", "b|Two.", "no pipe here"], ["a"], suffix=".flac")
    items = read_ljspeech(tmp_path)
    assert items[0].audio == tmp_path / "wavs" / "a.flac"
    assert items[1].audio == tmp_path / "wavs" / "b.wav" and not items[1].audio.exists()
    assert items[2].error is not None and items[2].error[0] == "bad_metadata"
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        read_ljspeech(tmp_path / "missing")
    with pytest.raises(ValueError, match="speaker_column"):
        read_ljspeech(tmp_path, speaker_column="maybe")


def test_sample_set_is_bundled_and_well_formed() -> None:
    items = load_items({"source": "sample"})
    assert len(items) == 16 and len({i.id for i in items}) == 16
    assert any("<laughs>" in i.text for i in items)
    for item in items:
        info = sf.info(str(item.audio))
        assert (info.samplerate, info.channels) == (TARGET_SR, 1)
        assert 1.5 <= info.duration <= 4.0
    size = sum(f.stat().st_size for f in (sample_root() / "wavs").iterdir())
    assert size < 2_000_000
    assert len(load_items({"source": "sample", "max_items": 3})) == 3


# --- manifest -----------------------------------------------------------------------------------


def test_manifest_relative_absolute_speaker_and_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "x.wav", tone(0.6, 22_050), 22_050)
    absolute = tmp_path / "abs.wav"
    sf.write(absolute, tone(0.6, 22_050), 22_050)
    rows = [
        {"audio": "clips/x.wav", "text": " Relative path. ", "speaker": "ann"},
        {"audio": str(absolute), "text": "Absolute path.", "id": "abs1", "speaker": 3},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"text": "no audio"}), ""]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(lines), encoding="utf-8")
    items = read_manifest(manifest)
    assert [(i.id, i.text, i.speaker) for i in items[:2]] == [
        ("clips/x", "Relative path.", "ann"),
        ("abs1", "Absolute path.", "3"),
    ]
    assert items[0].audio == tmp_path / "clips" / "x.wav" and items[1].audio == absolute
    assert [i.error[0] for i in items[2:] if i.error] == ["bad_metadata", "bad_metadata"]
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        load_items({"source": "manifest", "path": str(tmp_path / "none.jsonl")})
    with pytest.raises(ValueError, match="data.path"):
        load_items({"source": "manifest"})


def test_speaker_map_is_sorted_and_keeps_integer_names() -> None:
    assert speaker_map(["zoe", None, "adam", "zoe"]) == {"adam": 0, "zoe": 1}
    assert speaker_map(["10", "2", None]) == {"10": 10, "2": 2}
    assert speaker_map([None]) == {}


# --- elise (Hugging Face datasets) ----------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def elise_rows() -> dict[str, list]:
    return {
        "audio": [
            {"bytes": encoded(tone(0.6, 44_100, channels=2), 44_100, "FLAC"), "path": "e0.flac"},
            {"bytes": encoded(tone(0.8, 24_000), 24_000), "path": "e1.wav"},
        ],
        "text": ["Oh really? <laughs> That's great.", "  Second clip.  "],
        "speaker_name": ["Elise", "Elise"],
    }


def test_elise_parquet_is_read_through_datasets(tmp_path: Path, hf_cache: None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table(elise_rows()), path)
    for where in (path, path.parent):  # a file or a folder of parquet files
        items = load_items({"source": "elise", "path": str(where)})
        assert [(i.id, i.text, i.speaker) for i in items] == [
            ("000000", "Oh really? <laughs> That's great.", "Elise"),
            ("000001", "Second clip.", "Elise"),
        ]
        assert [len(read_audio(i.audio())) for i in items] == [14_400, 19_200]


def test_elise_save_to_disk_folder(tmp_path: Path, hf_cache: None) -> None:
    from datasets import Dataset, DatasetDict

    rows = elise_rows()
    rows["id"] = ["clip_a", "clip_b"]
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dd"))
    items = read_hf("ignored/name", tmp_path / "dd", split="train")
    assert [i.id for i in items] == ["clip_a", "clip_b"]
    assert isinstance(items[1].audio(), bytes)
    with pytest.raises(ValueError, match="split 'test'"):
        read_hf("ignored/name", tmp_path / "dd", split="test")
    Dataset.from_dict({"audio": rows["audio"], "words": ["a", "b"]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="lacks column"):
        read_hf("ignored/name", tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="data.path"):
        read_hf("ignored/name", tmp_path / "nothing")


def test_hub_failure_raises_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def fail(*args: object, **kwargs: object) -> None:
        raise ConnectionError("401 Client Error: Unauthorized\nfor url https://huggingface.co/...")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataUnavailable) as info:
        load_items({"source": "elise", "name": "Jinsaryko/Elise"})
    message = str(info.value)
    assert "\n" not in message
    for needle in (
        "Jinsaryko/Elise",
        "taken down",
        "data.path=",
        "ljspeech",
        "manifest",
        "keithito/lj_speech",
    ):
        assert needle in message


def test_bad_parquet_row_is_named_by_file_row_and_audio_path(tmp_path: Path, hf_cache: None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from elise.codec import build_codec
    from elise.data.prepare import prepare
    from elise.text import ByteTokenizer

    rows = elise_rows()
    rows["audio"][1] = {"bytes": b"RIFX not audio at all" * 20, "path": "e1.wav"}
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table(rows), path)
    items = load_items({"source": "elise", "path": str(path)})
    with pytest.raises(AudioError) as err:
        read_audio(items[1].audio())
    assert f"{path} row 1 (e1.wav)" in str(err.value) and "BytesIO" not in str(err.value)
    cfg = {"source": "elise", "path": str(path), "cache_dir": str(tmp_path / "cache"), "val_count": 0}
    data = prepare(cfg, build_codec("tiny"), ByteTokenizer(), progress=False)
    (skip,) = data.report["items"]
    assert skip["id"] == "000001" and skip["reason"] == "unreadable_audio"
    assert "row 1 (e1.wav)" in skip["detail"] and "BytesIO" not in skip["detail"]
    # the speaker map and clips per speaker, in the report file too
    report = json.loads((tmp_path / "cache" / "prepare_report.json").read_text())
    assert report["speakers"] == {"Elise": 0} and report["speaker_clips"] == {"Elise": 1}


def test_manifest_group_and_speaker_clips_in_the_report(tmp_path: Path) -> None:
    from elise.codec import build_codec
    from elise.data.prepare import prepare
    from elise.data.report import UNNAMED_SPEAKER
    from elise.text import ByteTokenizer

    for i in range(4):
        sf.write(tmp_path / f"a{i}.wav", tone(0.6, 24_000, freq=300.0 + 50 * i), 24_000)
    lines = [
        {"audio": "a0.wav", "text": "One.", "speaker": "zoe", "group": "talk1"},
        {"audio": "a1.wav", "text": "Two.", "speaker": "adam", "group": "talk1"},
        {"audio": "a2.wav", "text": "Three.", "speaker": "zoe"},
        {"audio": "a3.wav", "text": "Four."},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert [i.group for i in read_manifest(tmp_path / "m.jsonl")] == ["talk1", "talk1", None, None]
    cfg = {
        "source": "manifest",
        "path": str(tmp_path / "m.jsonl"),
        "cache_dir": str(tmp_path / "c"),
        "val_count": 0,
    }
    data = prepare(cfg, build_codec("tiny"), ByteTokenizer(), progress=False)
    assert [e.group for e in data.examples] == ["talk1", "talk1", None, None]
    assert data.report["speakers"] == {"adam": 0, "zoe": 1}
    assert data.report["speaker_clips"] == {"adam": 1, "zoe": 2, UNNAMED_SPEAKER: 1}
