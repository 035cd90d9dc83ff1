"""A corpus of broken inputs mixed with good clips (LJSpeech layout): preparation counts every bad
item under its exact reason, and a few training steps then train on every good clip, the 8 kHz and
the 48 kHz stereo clips included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from elise.config import compose
from elise.data.sources import sample_root
from elise.train import train


def sample(i: int) -> tuple[np.ndarray, str]:
    """Bundled clip i (24 kHz mono float32) and its text."""
    root = sample_root()
    wav, sr = sf.read(root / "wavs" / f"sample_{i:03d}.flac", dtype="float32")
    assert sr == 24_000
    text = (root / "metadata.csv").read_text(encoding="utf-8").splitlines()[i].split("|", 1)[1]
    return wav, text


def build_corpus(root: Path) -> dict[str, list[str]]:
    """Write the corpus; returns the expected ids per outcome ("kept" or a skip reason)."""
    wavs = root / "wavs"
    wavs.mkdir(parents=True)
    lines: list[str] = []
    expect: dict[str, list[str]] = {}

    def add(item_id: str, text: str, outcome: str, wav: np.ndarray | None = None, sr: int = 24_000) -> None:
        if wav is not None:
            sf.write(wavs / f"{item_id}.wav", wav, sr)
        lines.append(f"{item_id}|{text}")
        expect.setdefault(outcome, []).append(item_id)

    for i in range(4):
        wav, text = sample(i)
        add(f"good_{i}", text, "kept", wav)
    wav, text = sample(4)
    add("rate_8k", text, "kept", soxr.resample(wav, 24_000, 8_000), 8_000)
    wav, text = sample(5)
    wide = soxr.resample(wav, 24_000, 48_000)
    add("stereo_48k", text, "kept", np.stack([wide, 0.5 * wide], axis=1), 48_000)
    wav, text = sample(6)
    add("dup", text, "kept", wav)
    lines.append(f"dup|{text}")  # the same id again
    expect["duplicate_id"] = ["dup"]

    wav, text = sample(7)
    add("bad_header", text, "unreadable_audio", wav)
    data = bytearray((wavs / "bad_header.wav").read_bytes())
    data[:12] = b"RIFX\xff\xff\xff\xffJUNK"  # corrupt RIFF/WAVE header
    (wavs / "bad_header.wav").write_bytes(bytes(data))
    add("zero_bytes", "A file with nothing in it.", "unreadable_audio")
    (wavs / "zero_bytes.wav").write_bytes(b"")
    add("not_audio", "A text file named like a wav.", "unreadable_audio")
    (wavs / "not_audio.wav").write_text("this is not audio at all\n" * 50, encoding="utf-8")
    add("missing", "There is no file for this line.", "missing_file")
    add("silence", "Nothing but silence here.", "silent_audio", np.zeros(24_000, dtype=np.float32))
    rng = np.random.default_rng(0)
    add(
        "three_min",
        "A very long clip.",
        "too_long",
        0.1 * rng.standard_normal(180 * 24_000).astype(np.float32),
    )
    wav, _ = sample(8)
    add("empty_text", "", "empty_text", wav)
    add("blank_text", "   \t  ", "empty_text", wav)
    add("emoji_text", "😀🎉👍", "unspeakable_text", wav)
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return expect


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, fast_overrides) -> tuple[Path, dict, dict]:
    tmp = tmp_path_factory.mktemp("bad_corpus")
    expect = build_corpus(tmp / "data")
    extra = [
        "data=ljspeech",
        f"data.root={tmp / 'data'}",
        "data.val_count=0",
        "data.val_fraction=0",
        "data.max_samples=2",
        f"paths.cache_dir={tmp / 'cache'}",
        "trainer.max_steps=4",  # 7 clips, at most 2 per batch: 4 batches = one epoch
        "trainer.limit_val_batches=0",
        "callbacks.best=null",
        "callbacks.audio_samples=null",
        "callbacks.checkpoint=null",
        "+callbacks.batch_log._target_=elise.callbacks.BatchLog",
        f"hydra.run.dir={tmp / 'run'}",
    ]
    cfg = compose("train", [*fast_overrides, *extra], return_hydra_config=True)
    metrics = train(cfg)
    report = json.loads((tmp / "cache" / "codes" / "prepare_report.json").read_text(encoding="utf-8"))
    return tmp, expect, {"report": report, "metrics": metrics}


def test_every_bad_item_is_counted_under_its_reason(corpus_run):
    _, expect, out = corpus_run
    report = out["report"]
    reasons = {r: ids for r, ids in expect.items() if r != "kept"}
    assert {r: n for r, n in report["skipped"].items() if n} == {r: len(ids) for r, ids in reasons.items()}
    by_reason: dict[str, list[str]] = {}
    for item in report["items"]:
        by_reason.setdefault(item["reason"], []).append(item["id"])
        assert "\n" not in item["detail"]
    assert {r: sorted(ids) for r, ids in by_reason.items()} == {r: sorted(ids) for r, ids in reasons.items()}
    assert report["total"] == 17 and report["kept"] == report["train"] == 7 and report["val"] == 0
    assert report["encoded"] + report["cached"] == 7  # the file is rewritten by setup()'s cache-hit pass


def test_every_good_clip_is_trained_on(corpus_run):
    tmp, expect, out = corpus_run
    lines = (tmp / "run" / "batches_rank0.txt").read_text().split()
    seen = {i for ids in lines[1::2] for i in ids.split(",")}
    assert seen == set(expect["kept"])  # 8 kHz and 48 kHz stereo included; no bad item
    assert np.isfinite(out["metrics"]["train/loss"])
