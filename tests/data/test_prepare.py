"""prepare(): code cache (hits, resume), bad-data report, strict mode, train/val split, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from testkit import lj_folder, tone

import elise.data.cache
import elise.data.prepare as prep
from elise.codec import build_codec
from elise.codec.base import Codec
from elise.data.prepare import BadItem, assign_splits, prepare
from elise.text import ByteTokenizer, HFTokenizer, encode_prompt

ROOT = Path(__file__).resolve().parents[2]


class Interrupted(Exception):
    """Stands in for a kill in the middle of encoding."""


class CountingCodec(Codec):
    """The tiny codec, counting encode calls and clips; raises after ``fail_after`` batches."""

    def __init__(self, batch_size: int = 4, fail_after: int | None = None):
        super().__init__()
        self.inner = build_codec("tiny", batch_size=batch_size)
        self.batch_size, self.fail_after = batch_size, fail_after
        self.calls, self.clips, self.widths = 0, 0, []

    @property
    def identity(self) -> str:
        return self.inner.identity

    def encode(
        self, wav: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Interrupted("killed")
        self.calls += 1
        self.clips += wav.shape[0]
        self.widths.append(wav.shape[-1])
        return self.inner.encode(wav, lengths)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(codes)


def cfg_for(root: Path, cache: Path, **kw: object) -> dict:
    return {"source": "ljspeech", "root": str(root), "cache_dir": str(cache), **kw}


def test_sample_set_prepares_into_examples(tmp_path: Path) -> None:
    codec, tok = CountingCodec(batch_size=8), ByteTokenizer()
    data = prepare({"source": "sample", "cache_dir": str(tmp_path)}, codec, tok, progress=False)
    assert len(data.examples) == 16 and data.report["kept"] == 16
    assert (codec.calls, codec.clips) == (2, 16)  # batches of codec.batch_size
    assert codec.widths[0] < codec.widths[1]  # clips sorted by length: the short ones share a batch
    for ex in data.examples:
        info = sf.info(str(ROOT / "elise/assets/sample/wavs" / f"{ex.id}.flac"))
        assert ex.frames == math.ceil(info.frames / 1920)
        codes = np.load(ex.codes_path)
        assert codes.dtype == np.int16 and codes.shape == (32, ex.frames)
        assert codes.min() >= 0 and codes.max() < 2048
        assert ex.text_ids == encode_prompt(tok, ex.text, 0) and ex.speaker == 0
    # the cached codes are the codec's codes of the decoded clip
    ex = data.examples[0]
    wav = torch.from_numpy(elise.data.cache.read_audio(ROOT / "elise/assets/sample/wavs" / f"{ex.id}.flac"))
    ref, _ = codec.inner.encode(wav[None, None])  # [1, 32, T]
    np.testing.assert_array_equal(np.load(ex.codes_path), ref[0].numpy())
    report = json.loads((tmp_path / "prepare_report.json").read_text())
    assert report["kept"] == 16 and sum(report["skipped"].values()) == 0 and report["encoded"] == 16


def test_second_run_is_all_cache_hits_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = lj_folder(tmp_path / "lj", 6)
    cfg = cfg_for(root, tmp_path / "cache")
    first = prepare(cfg, CountingCodec(), ByteTokenizer(), progress=False)
    decodes = []
    monkeypatch.setattr(elise.data.cache, "read_audio", lambda src: decodes.append(src) or 1 / 0)
    codec = CountingCodec()
    second = prepare(cfg, codec, ByteTokenizer(), progress=False)
    assert codec.calls == 0 and decodes == []  # the audio index answers for unchanged files
    assert [e.codes_path for e in second.examples] == [e.codes_path for e in first.examples]
    assert second.report["cached"] == 6 and second.report["encoded"] == 0
    # a changed file (new size/mtime) is decoded and encoded again, alone
    monkeypatch.undo()
    sf.write(root / "wavs" / "c03.wav", tone(0.7, freq=999.0), 16_000)
    codec = CountingCodec()
    third = prepare(cfg, codec, ByteTokenizer(), progress=False)
    assert codec.clips == 1 and third.examples[3].codes_path != first.examples[3].codes_path


def test_codec_identity_keys_the_cache(tmp_path: Path) -> None:
    root = lj_folder(tmp_path / "lj", 3)
    cfg = cfg_for(root, tmp_path / "cache")
    prepare(cfg, CountingCodec(), ByteTokenizer(), progress=False)
    other = CountingCodec()
    other.inner = build_codec("tiny", seed=1)
    prepare(cfg, other, ByteTokenizer(), progress=False)
    assert other.clips == 3


def test_killed_run_resumes_without_reencoding(tmp_path: Path) -> None:
    root = lj_folder(tmp_path / "lj", 10)
    cfg = cfg_for(root, tmp_path / "cache")
    with pytest.raises(Interrupted):
        prepare(cfg, CountingCodec(batch_size=3, fail_after=2), ByteTokenizer(), progress=False)
    assert len(list((tmp_path / "cache").glob("*/*.npy"))) == 6  # two whole batches written
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    codec = CountingCodec(batch_size=3)
    data = prepare(cfg, codec, ByteTokenizer(), progress=False)
    assert codec.clips == 4 and len(data.examples) == 10
    assert data.report["cached"] == 6 and data.report["encoded"] == 4


def bad_folder(root: Path) -> Path:
    """One folder with every kind of bad item next to three good ones."""
    wavs = root / "wavs"
    wavs.mkdir(parents=True)
    write = {
        "good1": tone(0.6),
        "good2": tone(0.7, freq=400),
        "good3": tone(0.8, freq=500),
        "empty": np.zeros(0, np.float32),
        "silent": np.zeros(16_000, np.float32),
        "short": tone(0.2),
        "long": tone(3.0),
        "notext": tone(0.6, freq=600),
        "spaces": tone(0.6, freq=610),
        "emoji": tone(0.6, freq=620),
        "punct": tone(0.6, freq=630),
        "badbytes": tone(0.6, freq=640),
    }
    for name, wav in write.items():
        sf.write(wavs / f"{name}.wav", wav, 16_000)
    (wavs / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    lines = [
        f"{name}|Text of {name}." for name in ("good1", "good2", "good3", "empty", "silent", "short", "long")
    ]
    lines += ["notext|", "spaces|   \t ", "emoji|\U0001f600\U0001f389", "punct|?! ... --", "corrupt|Corrupt."]
    lines += ["missing|No file.", "good1|Same id again.", "no separator here"]
    text = "\n".join(lines).encode("utf-8") + b"\nbadbytes|caf\xe9 \xff\n"  # latin-1 bytes: not UTF-8
    (root / "metadata.csv").write_bytes(text)
    return root


EXPECTED_SKIPS = {
    "bad_metadata": 1,
    "duplicate_id": 1,
    "empty_text": 2,
    "unspeakable_text": 2,
    "untokenizable_text": 1,
    "missing_file": 1,
    "unreadable_audio": 1,
    "empty_audio": 1,
    "silent_audio": 1,
    "too_short": 1,
    "too_long": 1,
}


def test_every_bad_item_is_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = bad_folder(tmp_path / "bad")
    cfg = cfg_for(root, tmp_path / "cache", max_seconds=2.0, min_seconds=0.5, val_count=1)
    data = prepare(cfg, CountingCodec(), ByteTokenizer(), progress=False)
    assert sorted(e.id for e in data.examples) == ["good1", "good2", "good3"]
    assert data.report["skipped"] == EXPECTED_SKIPS
    report = json.loads((tmp_path / "cache" / "prepare_report.json").read_text())
    assert report["kept"] == 3 and report["skipped"] == EXPECTED_SKIPS
    reasons = {(i["id"], i["reason"]) for i in report["items"]}
    assert {("silent", "silent_audio"), ("corrupt", "unreadable_audio"), ("good1", "duplicate_id")} <= reasons
    assert {("badbytes", "untokenizable_text"), ("emoji", "unspeakable_text")} <= reasons
    assert all(i["detail"] for i in report["items"])
    prep.print_report(report)
    printed = capsys.readouterr().out
    assert "skipped: silent_audio" in printed and "too_short" in printed and "skipped: empty_audio" in printed


def test_strict_mode_raises_on_first_bad_item(tmp_path: Path) -> None:
    root = bad_folder(tmp_path / "bad")
    cfg = cfg_for(root, tmp_path / "cache", strict=True)
    with pytest.raises(BadItem, match=r"^empty: empty_audio") as info:
        prepare(cfg, CountingCodec(), ByteTokenizer(), progress=False)
    assert "\n" not in str(info.value)
    with pytest.raises(BadItem):  # the argument works as well as the config key
        prepare({**cfg, "strict": False}, CountingCodec(), ByteTokenizer(), strict=True, progress=False)


def test_unknown_token_of_hf_tokenizer_is_untokenizable(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[", "]", "0", "clip", "number", "."] + [str(i) for i in range(1, 10)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    root = lj_folder(tmp_path / "lj", 2)
    text = (root / "metadata.csv").read_text().replace("Clip number 1.", "Clip zebra 1.").lower()
    (root / "metadata.csv").write_text(text)
    data = prepare(
        cfg_for(root, tmp_path / "cache"),
        CountingCodec(),
        HFTokenizer.from_json(tok.to_str()),
        progress=False,
    )
    assert [e.id for e in data.examples] == ["c00"]
    assert data.report["skipped"]["untokenizable_text"] == 1


def test_speakers_map_to_sorted_ids(tmp_path: Path) -> None:
    root = lj_folder(tmp_path / "lj", 3)
    lines = ["c00|zoe|Hello.", "c01|adam|Hello.", "c02|zoe|Hi."]
    (root / "metadata.csv").write_text("\n".join(lines))
    data = prepare(cfg_for(root, tmp_path / "cache"), CountingCodec(), ByteTokenizer(), progress=False)
    assert [e.speaker for e in data.examples] == [1, 0, 1]
    assert data.examples[1].text_ids == ByteTokenizer().encode("[0]Hello.")
    assert data.report["speakers"] == {"adam": 0, "zoe": 1}


def test_split_is_disjoint_deterministic_and_stable() -> None:
    ids = [f"clip{i}" for i in range(400)]
    split = assign_splits(ids, val_fraction=0.1, seed=3)
    val = {i for i, s in split.items() if s == "val"}
    assert set(split.values()) == {"train", "val"} and 20 < len(val) < 60
    assert assign_splits(ids, val_fraction=0.1, seed=3) == split
    assert assign_splits(ids, val_fraction=0.1, seed=4) != split
    # adding and removing other ids never moves an id
    changed = assign_splits(ids[50:] + [f"new{i}" for i in range(100)], val_fraction=0.1, seed=3)
    assert all(changed[i] == split[i] for i in ids[50:])
    assert sum(s == "val" for s in assign_splits(ids, val_count=7).values()) == 7
    assert list(assign_splits(["a", "b"], val_fraction=0.01).values()).count("val") == 1
    assert assign_splits(["only"]) == {"only": "train"}
    assert set(assign_splits(ids[:5], val_fraction=0.0).values()) == {"train"}


def test_prepared_splits_follow_assign_splits(tmp_path: Path) -> None:
    root = lj_folder(tmp_path / "lj", 8)
    data = prepare(
        cfg_for(root, tmp_path / "cache", val_count=2), CountingCodec(), ByteTokenizer(), progress=False
    )
    assert len(data.split("val")) == 2 and len(data.split("train")) == 6
    assert {e.id: e.split for e in data.examples} == assign_splits([e.id for e in data.examples], val_count=2)


@pytest.mark.parametrize("data", ["elise", "ljspeech", "manifest", "sample"])
def test_prepare_config_composes_with_every_source(data: str) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "elise" / "conf"), version_base="1.3"):
        cfg = compose("prepare", overrides=[f"data={data}", "codec=tiny"])
    assert cfg.data.source == data and cfg.tokenizer == "bytes" and cfg.codec.name == "tiny"
    keys = {"cache_dir", "min_seconds", "max_seconds", "silence_threshold", "val_fraction", "val_count"}
    keys |= {
        "split_seed",
        "strict",
        "speaker_column",
        "max_items",
        "max_samples",
        "max_tokens",
        "num_workers",
    }
    assert keys <= set(cfg.data)
    assert cfg.data.cache_dir.endswith("/codes") and (cfg.data.max_samples, cfg.data.max_tokens) == (16, 5000)


def run_cli(*overrides: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ELISE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "elise.prepare", "codec=tiny", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_cli_wrong_path_exits_2_with_one_line(tmp_path: Path) -> None:
    out = run_cli("data=ljspeech", f"data.root={tmp_path}/nowhere", cache=tmp_path / "c")
    assert out.returncode == 2
    assert out.stderr.startswith("error: no metadata.csv") and out.stderr.count("\n") == 1
    assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.slow
def test_cli_prepares_the_sample_set(tmp_path: Path) -> None:
    out = run_cli("data=sample", cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "codes" / "prepare_report.json").read_text())["kept"] == 16
    assert str(tmp_path / "codes") in out.stdout
