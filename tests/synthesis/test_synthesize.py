"""Synthesis end to end on CPU with a tiny model and the tiny codec: wav format and length, numbering,
voice prompt rows, seeds, EOS, the text-scaled length bound, saved codes, streaming, batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import DictConfig
from testkit import save_tiny

from elise.codec import build_codec
from elise.config import compose
from elise.data.audio import WavWriter
from elise.layout import EOS_CODE, NUM_CODEBOOKS, TEXT_COL
from elise.synthesis import Segment, build_prompt, load_references
from elise.synthesize import run
from elise.text import ByteTokenizer, encode_prompt

SPF = 1920


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt: Path) -> Path:
    return tiny_ckpt


def config(ckpt: Path, **values) -> DictConfig:
    """The real composed config (struct mode: reading an undefined key fails) with values set."""
    cfg = compose("synthesize", ["codec=tiny"])
    base = {"ckpt": str(ckpt), "top_k": 1, "seed": 0, "max_audio_seconds": 0.4, "device": "cpu"}
    for key, value in {**base, **values}.items():
        cfg[key] = value
    return cfg


def test_wav_rate_length_and_saved_codes(ckpt, tmp_path):
    out = tmp_path / "hello.wav"
    [m] = run(
        config(
            ckpt, text="Hello there", output=str(out), save_codes=True, metrics_out=str(tmp_path / "m.json")
        )
    )
    info = sf.info(out)
    assert (info.samplerate, info.channels, info.subtype, info.format) == (24_000, 1, "PCM_16", "WAV")
    assert m["frames"] == 5 and not m["eos"]  # 0.4 s = 5 frames, random heads never emit EOS
    assert info.frames == 5 * SPF and m["audio_seconds"] == pytest.approx(0.4)
    codes = np.load(tmp_path / "hello.codes.npy")
    assert codes.shape == (NUM_CODEBOOKS, 5) and codes.dtype == np.int64 and codes.max() < 2048
    # the wav is the codec's decoding of the saved codes (up to 16-bit rounding)
    ref = build_codec("tiny").decode(torch.from_numpy(codes)[None])[0, 0].numpy()
    wav, _ = sf.read(out, dtype="float32")
    assert np.abs(wav - np.clip(ref, -1, 1)).max() < 1e-4
    assert {"audio_seconds", "generation_seconds", "rtf", "frames", "model_load_seconds"} <= set(m)
    assert (tmp_path / "m.json").read_text().count('"rtf"') == 1


def test_text_file_numbering(ckpt, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("First line\n\n   \nSecond one\nThird\n", encoding="utf-8")
    metrics = run(
        config(ckpt, text_file=str(lines), output_dir=str(tmp_path / "out"), max_audio_seconds=0.16)
    )
    assert [m["text"] for m in metrics] == ["First line", "Second one", "Third"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0001.wav", "0002.wav", "0003.wav"]
    assert [Path(m["path"]).name for m in metrics] == ["0001.wav", "0002.wav", "0003.wav"]


def test_reference_prompt_rows(tmp_path):
    tok, codec = ByteTokenizer(), build_codec("tiny")
    clip = tmp_path / "ref.wav"
    t = np.arange(16_000 * 5 // 4) / 16_000  # 1.25 s at 16 kHz, stereo
    sf.write(clip, np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], 1) * 0.3, 16_000)
    [seg] = load_references(str(clip), "Reference words", 0, codec)
    assert seg.codes.shape == (NUM_CODEBOOKS, 16)  # 30000 samples at 24 kHz -> ceil(30000 / 1920)
    plain_tokens, _ = build_prompt(tok, "Target", 0)
    tokens, mask = build_prompt(tok, "Target", 0, [seg])
    ref_ids, target_ids = encode_prompt(tok, "Reference words", 0), encode_prompt(tok, "Target", 0)
    n = len(ref_ids)
    assert tokens.shape[0] == n + 16 + 1 + len(target_ids)
    assert tokens[:n, TEXT_COL].tolist() == ref_ids and mask[:n, TEXT_COL].all() and not mask[:n, :32].any()
    assert torch.equal(tokens[n : n + 16, :32], seg.codes.t()) and mask[n : n + 16, :32].all()
    assert (tokens[n + 16, :32] == EOS_CODE).all() and mask[n + 16, :32].all()  # context ends with EOS
    assert torch.equal(tokens[n + 17 :], plain_tokens)  # then the target text, no audio


def test_reference_audio_end_to_end(ckpt, tmp_path):
    clip = tmp_path / "ref.flac"
    sf.write(clip, 0.2 * np.random.default_rng(0).standard_normal(44_100 * 3 // 2), 44_100)
    base = dict(text="Same words", max_audio_seconds=0.24)
    [plain] = run(config(ckpt, **base, output=str(tmp_path / "a.wav"), save_codes=True))
    [voiced] = run(
        config(ckpt, **base, output=str(tmp_path / "b.wav"), save_codes=True,
               reference_audio=[str(clip)], reference_text=["Some reference"])
    )  # fmt: skip
    assert plain["frames"] == voiced["frames"] == 3
    assert not np.array_equal(np.load(tmp_path / "a.codes.npy"), np.load(tmp_path / "b.codes.npy"))


def test_seed_determinism(ckpt, tmp_path):
    def sample(name: str, seed: int) -> bytes:
        run(config(ckpt, text="Seeded", output=str(tmp_path / name), top_k=50, temperature=1.0, seed=seed))
        return (tmp_path / name).read_bytes()

    assert sample("a.wav", 3) == sample("b.wav", 3)
    assert sample("c.wav", 4) != (tmp_path / "a.wav").read_bytes()


def test_eos_stops_generation(tmp_path):
    ckpt = save_tiny(tmp_path / "eos.ckpt", zero_norm=True)
    # an 8 s limit: without the stop this returns 100 frames
    cfg = config(ckpt, text="Stop at once", output=str(tmp_path / "e.wav"), max_audio_seconds=8)
    cfg.length.min_seconds_per_char = 0.0
    [m] = run(cfg)
    assert m["eos"] and m["frames"] == 0 and sf.info(tmp_path / "e.wav").frames == 0
    # the length floor: no end before 0.05 s per character (12 characters: 7 frames)
    [m] = run(config(ckpt, text="Stop at once", output=str(tmp_path / "f.wav"), max_audio_seconds=8))
    assert m["eos"] and m["frames"] == 7


def test_length_bound_scales_with_text(ckpt, tmp_path):
    length = {"seconds_per_char": 0.01, "margin": 1.0, "extra_seconds": 0.16, "min_seconds_per_char": 0.0}
    frames = []
    for text in ("Ten chars!", "Thirty characters of text here"):
        cfg = config(ckpt, text=text, output=str(tmp_path / "x.wav"), max_audio_seconds=None, overwrite=True)
        cfg.length = length
        frames.append(run(cfg)[0]["frames"])
    # ceil(12.5 * (0.16 + 0.01 * chars)): 10 chars -> 4 frames, 30 chars -> 6 frames
    assert frames == [4, 6]


def test_stream_equals_full_and_is_readable_after_each_chunk(ckpt, tmp_path, monkeypatch):
    base = dict(text="First sentence here. And the second one!", max_audio_seconds=0.4, pause_ms=100)
    [full] = run(config(ckpt, **base, output=str(tmp_path / "full.wav")))
    seen: list[tuple[int, int]] = []
    append = WavWriter.append

    def checked(self, wav):
        append(self, wav)
        seen.append((sf.read(self.path)[0].shape[0], self.num_samples))  # a valid file after every chunk

    monkeypatch.setattr(WavWriter, "append", checked)
    [streamed] = run(config(ckpt, **base, output=str(tmp_path / "s.wav"), stream=True, stream_chunk_frames=2))
    assert full["pieces"] == 2 and full["frames"] == streamed["frames"] == 10
    assert len(seen) == 7  # 3 chunks of 2, 2, 1 frames, a pause, 3 chunks
    assert all(read == written for read, written in seen)
    a, b = sf.read(tmp_path / "s.wav", dtype="int16")[0], sf.read(tmp_path / "full.wav", dtype="int16")[0]
    # same samples; decoding 2 frames vs a whole piece may round one sample differently (1 LSB)
    assert a.shape == b.shape == (10 * SPF + 2400,) and np.abs(a.astype(int) - b).max() <= 1
    assert streamed["first_chunk_seconds"] is not None and full["first_chunk_seconds"] is None
    assert 0 < streamed["first_chunk_seconds"] < streamed["generation_seconds"]


def test_batch_equals_one_by_one(ckpt, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text(
        "Short.\nA somewhat longer line. With two sentences here.\nMiddle length\n", encoding="utf-8"
    )
    codes = {}
    for bs in (1, 3):
        out = tmp_path / f"b{bs}"
        metrics = run(config(ckpt, text_file=str(lines), output_dir=str(out), batch_size=bs, save_codes=True,
                             max_audio_seconds=0.24, min_sentence_chars=0))  # fmt: skip
        assert [m["batch_size"] for m in metrics] == [bs] * 3
        codes[bs] = [np.load(out / f"{i:04d}.codes.npy") for i in (1, 2, 3)]
    assert [c.shape[1] for c in codes[1]] == [3, 6, 3]  # line 2 has two pieces
    for one, batched in zip(codes[1], codes[3], strict=True):
        np.testing.assert_array_equal(one, batched)


def test_previous_piece_context_and_room(ckpt):
    """The previous piece (text + audio + EOS rows) precedes a piece's text when it fits in the model's
    positions with the piece's frame limit, and is dropped when it does not."""
    from elise.checkpoints import load_model
    from elise.synthesis import Settings, Synthesizer

    loaded = load_model(ckpt)
    tok, codec = loaded.tokenizer, build_codec("tiny")
    synth = Synthesizer(loaded.model, tok, codec, Settings(max_audio_seconds=0.4))
    previous = Segment("One piece here.", 0, torch.ones(NUM_CODEBOOKS, 7, dtype=torch.long))
    (alone, _), limit, _ = synth.prompt("Another piece!", 0, None)
    (tokens, _), _, _ = synth.prompt("Another piece!", 0, previous)
    assert (
        limit == 5 and tokens.shape[0] == alone.shape[0] + len(encode_prompt(tok, "One piece here.", 0)) + 8
    )
    assert torch.equal(tokens[-alone.shape[0] :], alone)
    long_previous = Segment("x", 0, torch.ones(NUM_CODEBOOKS, 2040, dtype=torch.long))
    (tokens, _), _, _ = synth.prompt("Another piece!", 0, long_previous)
    assert torch.equal(tokens, alone)


def test_segment_rows_helper_matches_prompt():
    tok = ByteTokenizer()
    seg = Segment("hi", 1, torch.ones(NUM_CODEBOOKS, 2, dtype=torch.long))
    tokens, _ = seg.rows(tok)
    assert tokens.shape[0] == len(encode_prompt(tok, "hi", 1)) + 3
