"""data=folder: recordings cut at pauses (silero-vad), sidecar transcripts over ASR, bad files counted,
the manifest kept across reruns. Speech is made at test time with espeak-ng (skipped without it)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from testkit import tone

from elise.codec import build_codec
from elise.config import compose
from elise.data.audio import TARGET_SR, read_audio
from elise.data.folder import out_dir, read_folder, text_units
from elise.data.prepare import prepare
from elise.text import ByteTokenizer
from tests.evaluate.conftest import tiny_whisper  # noqa: F401 - a fixture: a random-weight local Whisper

ROOT = Path(__file__).resolve().parents[2]
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "How vexingly quick daft zebras jump.",
    "Sphinx of black quartz, judge my vow.",
)
PAUSE = 0.7  # seconds of silence put between sentences
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


class StubASR:
    """Counts its calls; the text says which call it was."""

    id = "stub-asr"

    def __init__(self) -> None:
        self.calls = 0

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        assert sample_rate == 16_000 and audio.dtype == np.float32 and audio.ndim == 1
        self.calls += 1
        return f"clip number {self.calls}"


class NoASR:
    id = "never"

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        raise AssertionError("a finished clip was transcribed again")


@functools.cache
def spoken(sentence: str) -> np.ndarray:
    """espeak-ng's reading of ``sentence``, float32 [N] at 24 kHz, its leading/trailing silence trimmed."""
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-w", str(wav_path), sentence], check=True, capture_output=True)
        wav = read_audio(wav_path)
    loud = np.flatnonzero(np.abs(wav) > 1e-3)
    return wav[loud[0] : loud[-1] + 1]


def recording(path: Path, sentences: tuple[str, ...], pause: float = PAUSE) -> list[tuple[float, float]]:
    """Write the sentences separated by ``pause`` s of silence (and framed by it); return each sentence's
    (start, end) in seconds."""
    gap = np.zeros(int(pause * TARGET_SR), np.float32)
    parts, spans, at = [gap], [], len(gap)
    for s in sentences:
        wav = spoken(s)
        spans.append((at / TARGET_SR, (at + len(wav)) / TARGET_SR))
        parts += [wav, gap]
        at += len(wav) + len(gap)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.concatenate(parts), TARGET_SR)
    return spans


def settings(root: Path, **kw: object) -> dict:
    return {"source": "folder", "root": str(root), "transcribe": "none", **kw}


def manifest_rows(root: Path, **kw: object) -> list[dict]:
    path = out_dir(settings(root, **kw)) / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def in_a_pause(t: float, spans: list[tuple[float, float]], total: float) -> bool:
    """True when ``t`` is at a file edge or between two sentences (not inside one)."""
    edge = 0 <= t <= spans[0][0] or spans[-1][1] <= t <= total
    return edge or any(a[1] <= t <= b[0] for a, b in zip(spans, spans[1:], strict=False))


@needs_espeak
@pytest.mark.parametrize("pad", [0.15, 1.0])  # 1.0: more than half a pause, so clips stop at its middle
def test_cut_points_fall_in_the_pauses_one_clip_per_sentence(tmp_path: Path, pad: float) -> None:
    spans = recording(tmp_path / "rec" / "long.wav", SENTENCES)
    total = spans[-1][1] + PAUSE
    asr = StubASR()
    items = read_folder(settings(tmp_path / "rec", pad=pad), asr=asr)
    rows = manifest_rows(tmp_path / "rec")
    assert all(b["start"] >= a["end"] for a, b in zip(rows, rows[1:], strict=False))  # no shared audio
    assert len(rows) == len(SENTENCES) == asr.calls == len(items)
    for row, (s, e) in zip(rows, spans, strict=True):
        assert in_a_pause(row["start"], spans, total) and in_a_pause(row["end"], spans, total), (row, spans)
        assert row["start"] <= s and row["end"] >= e  # the whole sentence is in its clip
        assert row["source"] == "long.wav" and row["transcript"] == "stub-asr"
        clip = read_audio(out_dir(settings(tmp_path / "rec")) / row["audio"])
        assert len(clip) / TARGET_SR == pytest.approx(row["end"] - row["start"], abs=1e-3)
    assert [it.text for it in items] == [f"clip number {i}" for i in range(1, 5)]


@needs_espeak
def test_short_sentences_merge_up_to_min_clip_within_max_clip(tmp_path: Path) -> None:
    spans = recording(tmp_path / "rec" / "long.flac", SENTENCES)
    pair = spans[1][1] - spans[0][0]  # two sentences and the pause between them
    read_folder(settings(tmp_path / "rec", min_clip=pair - 0.5, max_clip=pair + 1.0), asr=StubASR())
    rows = manifest_rows(tmp_path / "rec")
    assert len(rows) == 2  # sentences 1+2 and 3+4
    assert rows[0]["start"] <= spans[0][0] and spans[1][1] <= rows[0]["end"] <= spans[2][0]
    assert spans[1][1] <= rows[1]["start"] <= spans[2][0] and rows[1]["end"] >= spans[3][1]
    assert all(r["end"] - r["start"] <= pair + 1.0 for r in rows)


@needs_espeak
def test_speech_longer_than_max_clip_is_cut_in_its_short_pauses(tmp_path: Path) -> None:
    spans = recording(tmp_path / "rec" / "long.wav", SENTENCES * 2, pause=0.2)  # 0.2 s < min_pause
    read_folder(settings(tmp_path / "rec", max_clip=8.0), asr=StubASR())
    rows = manifest_rows(tmp_path / "rec")
    assert len(rows) >= 3 and all(r["end"] - r["start"] <= 8.0 for r in rows)
    total = spans[-1][1] + 0.2
    assert all(in_a_pause(t, spans, total) for r in rows for t in (r["start"], r["end"]))


@needs_espeak
def test_sidecar_transcripts_win_over_asr(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    recording(root / "a.wav", SENTENCES[:1])
    (root / "a.txt").write_text("The quick brown fox, typed by hand.\n")
    recording(root / "sub" / "b.ogg", SENTENCES[1:2])
    (root / "sub" / "b.lab").write_text("Five dozen jugs, from the lab file.")
    recording(root / "c.wav", SENTENCES[2:3])  # no sidecar: the ASR
    asr = StubASR()
    items = {it.id: it for it in read_folder(settings(root), asr=asr)}
    assert asr.calls == 1
    assert items["a_000"].text == "The quick brown fox, typed by hand."
    assert items["sub/b_000"].text == "Five dozen jugs, from the lab file."
    assert items["c_000"].text == "clip number 1"
    sources = {r["id"]: r["transcript"] for r in manifest_rows(root)}
    assert sources == {"a_000": "sidecar", "sub/b_000": "sidecar", "c_000": "stub-asr"}


@needs_espeak
def test_long_recording_with_sidecar_gets_one_sentence_per_clip(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    spans = recording(root / "long.wav", SENTENCES)
    (root / "long.txt").write_text(" ".join(SENTENCES))
    max_clip = spans[1][1] - spans[0][0]  # longer than any sentence, shorter than the recording
    items = read_folder(settings(root, max_clip=max_clip), asr=NoASR())
    assert [it.text for it in items] == list(SENTENCES)
    for row, (s, e) in zip(manifest_rows(root, max_clip=max_clip), spans, strict=True):
        assert row["start"] <= s and row["end"] >= e and row["end"] - row["start"] <= max_clip


@needs_espeak
def test_a_sidecar_that_cannot_be_split_at_pauses_is_counted(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    spans = recording(root / "long.wav", SENTENCES)
    (root / "long.txt").write_text("one sentence without an end for four spoken ones")
    cfg = settings(root, max_clip=spans[1][1] - spans[0][0], cache_dir=str(tmp_path / "cache"))
    report = prepare(cfg, build_codec("tiny"), ByteTokenizer(), progress=False).report
    assert report["kept"] == 0 and report["skipped"]["sidecar_unaligned"] == 1
    assert "1 sentence(s)/line(s)" in report["items"][0]["detail"]


def test_text_units_are_lines_else_sentences() -> None:
    assert text_units("One. Two!  Three?\n") == ["One.", "Two!", "Three?"]
    assert text_units("first line. still first\nsecond line\n\n") == [
        "first line. still first",
        "second line",
    ]


def test_unreadable_files_are_counted_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "rec"
    root.mkdir()
    sf.write(root / "good.wav", tone(1.0, freq=300.0), 16_000)
    (root / "good.txt").write_text("A good clip.")
    (root / "broken.wav").write_bytes(b"RIFF not really a wave file")
    (root / "phone.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A not decodable here")
    (root / "notes.txt").write_text("not a recording")
    cfg = settings(root, cache_dir=str(tmp_path / "cache"), min_seconds=0.5, val_count=0)
    data = prepare(cfg, build_codec("tiny"), ByteTokenizer(), progress=False)
    report = data.report
    assert report["kept"] == 1 and report["skipped"]["unreadable_audio"] == 2
    details = {s["id"]: s["detail"] for s in report["items"]}
    assert set(details) == {"broken.wav", "phone.m4a"}
    import audioread

    if len(audioread.available_backends()) == 1:  # raw wav/aiff reader only: no ffmpeg, no GStreamer
        assert "install ffmpeg" in details["phone.m4a"]
    assert "1 clips, 2 skipped" in capsys.readouterr().out


def test_a_recording_without_speech_is_counted(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    root.mkdir()
    sf.write(root / "hum.wav", tone(3.0, freq=300.0) * 0.01, 16_000)
    (root / "hum.txt").write_text("")  # an empty sidecar is no transcript: the VAD runs, finds no speech
    cfg = settings(root, cache_dir=str(tmp_path / "cache"), val_count=0)
    report = prepare(cfg, build_codec("tiny"), ByteTokenizer(), progress=False).report
    assert report["kept"] == 0 and report["skipped"]["no_speech"] == 1


@needs_espeak
def test_without_an_asr_texts_are_left_empty_to_fill_in(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    recording(root / "a.wav", SENTENCES[:2])
    cfg = settings(root, cache_dir=str(tmp_path / "cache"), val_count=0)  # transcribe=none
    report = prepare(cfg, build_codec("tiny"), ByteTokenizer(), progress=False).report
    assert report["skipped"]["empty_text"] == 2
    rows = manifest_rows(root)
    assert [(r["text"], r["transcript"]) for r in rows] == [("", "none"), ("", "none")]
    rows[0]["text"], rows[1]["text"] = SENTENCES[:2]  # the user fills them in
    (out_dir(cfg) / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = prepare(cfg, build_codec("tiny"), ByteTokenizer(), progress=False).report
    assert report["kept"] == 2 and report["skipped"]["empty_text"] == 0


@needs_espeak
def test_rerun_keeps_finished_files_and_the_users_corrections(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    recording(root / "a.wav", SENTENCES[:2])
    recording(root / "b.wav", SENTENCES[2:])
    read_folder(settings(root), asr=StubASR())
    out = out_dir(settings(root))
    rows = manifest_rows(root)
    mtimes = {r["audio"]: (out / r["audio"]).stat().st_mtime_ns for r in rows}
    rows[0]["text"] = "Corrected by the user."
    del rows[1]  # a clip the user did not want
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    items = read_folder(settings(root), asr=NoASR())  # nothing transcribed again
    assert [it.text for it in items][:1] == ["Corrected by the user."] and len(items) == 3
    assert all((out / r["audio"]).stat().st_mtime_ns == mtimes[r["audio"]] for r in rows)
    os.utime(root / "a.wav", (1e9, 1e9))  # copied without its times: the same bytes, still done
    assert [it.text for it in read_folder(settings(root), asr=NoASR())] == [it.text for it in items]

    recording(root / "b.wav", SENTENCES[3:])  # changed: cut again; a.wav's lines stay
    (root / "a.wav").rename(root / "a2.wav")  # moved: new file; the old clips are removed
    asr = StubASR()
    read_folder(settings(root), asr=asr)
    rows = manifest_rows(root)
    assert asr.calls == 3 and [r["source"] for r in rows] == ["a2.wav", "a2.wav", "b.wav"]
    assert sorted(p.name for p in (out / "clips").iterdir()) == ["a2_000.wav", "a2_001.wav", "b_000.wav"]


@needs_espeak
def test_whisper_through_transformers_transcribes_with_the_configured_model(
    tmp_path: Path,
    tiny_whisper: Path,  # noqa: F811 - the imported fixture
) -> None:
    root = tmp_path / "rec"
    recording(root / "a.wav", SENTENCES[:1])
    items = read_folder(settings(root, transcribe="whisper", asr_model=str(tiny_whisper)))
    row = manifest_rows(root)[0]
    assert row["transcript"].startswith(f"whisper:{tiny_whisper} ") and isinstance(items[0].text, str)


@pytest.mark.slow  # ~8 s on one core; tests/evaluate guards pocketsphinx itself
@needs_espeak
def test_offline_pocketsphinx_transcribes(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    recording(root / "a.wav", SENTENCES[:1])
    items = read_folder(settings(root, transcribe="pocketsphinx"))
    assert (
        len(items) == 1 and items[0].text.strip()
    )  # what it hears in espeak-ng's voice: words, not accurate
    assert manifest_rows(root)[0]["transcript"].startswith("pocketsphinx")


@needs_espeak
def test_an_asr_that_cannot_load_is_a_one_line_error(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    recording(root / "a.wav", SENTENCES[:1])
    with pytest.raises(
        ValueError, match=r"^data.transcribe=whisper: cannot load Whisper model .*no-such-model"
    ):
        read_folder(settings(root, transcribe="whisper", asr_model=str(tmp_path / "no-such-model")))


def test_the_asr_is_loaded_only_when_a_clip_needs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import elise.evaluate.asr

    def no_load(**kw: object) -> None:
        raise AssertionError(f"ASR loaded: {kw}")

    monkeypatch.setattr(elise.evaluate.asr, "load_asr", no_load)
    root = tmp_path / "rec"
    root.mkdir()
    sf.write(root / "a.wav", tone(2.5, freq=300.0), 16_000)
    (root / "a.lab").write_text("Every clip has its sidecar.")
    items = read_folder(settings(root, transcribe="whisper"))
    assert [it.text for it in items] == ["Every clip has its sidecar."]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("min_clip", 30.0, "min_clip < data.max_clip"),
        ("pad", 10.0, "2 \\* data.pad"),
        ("transcribe", "x", "one of"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path: Path, key: str, value: object, message: str) -> None:
    root = tmp_path / "rec"
    root.mkdir()
    sf.write(root / "a.wav", tone(1.0), 16_000)
    with pytest.raises(ValueError, match=message):
        read_folder(settings(root, **{key: value}))


def test_folder_config_composes_and_inherits_the_shared_keys() -> None:
    text = yaml.safe_load((ROOT / "elise" / "conf" / "data" / "folder.yaml").read_text())
    assert text["defaults"] == ["default", "_self_"]
    cfg = compose("train", ["data=folder", "data.root=my_voice"])
    assert cfg.data.source == "folder" and cfg.data.max_clip == 20.0 and cfg.data.transcribe == "auto"
    assert cfg.data.max_tokens == compose("train", ["data=sample"]).data.max_tokens


@pytest.mark.slow  # a subprocess (~15 s); the one-line path of prepare is guarded by tests/data/test_prepare.py
def test_cli_missing_folder_exits_2_with_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "elise.prepare", "data=folder", f"data.root={tmp_path}/no such folder",
           "codec=tiny", f"data.cache_dir={tmp_path}/cache"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "recordings folder not found" in proc.stderr and "no such folder" in proc.stderr
