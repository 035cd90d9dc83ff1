"""Synthesis building blocks: sentence splitting, the length bound, the wav writer, int8 weights, compile."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import soundfile as sf
import torch

from elise.data.audio import WavWriter
from elise.generate import SamplingConfig, generate
from elise.layout import text_rows
from elise.model import build_model
from elise.synthesis import LengthBound, SynthesisError, max_frames, split_sentences
from elise.synthesis.runtime import prepare_model


def test_split_sentences_at_sentence_ends_not_abbreviations():
    text = 'Dr. Smith arrived at 3.30 p.m. today!  Did he?\nYes; he did. "Really." Fine'
    assert split_sentences(text, min_chars=0) == [
        "Dr. Smith arrived at 3.30 p.m. today!", "Did he?", "Yes;", "he did.", '"Really."', "Fine",
    ]  # fmt: skip
    # short pieces are joined to a neighbour while the result fits
    assert split_sentences("Hi. I'm here. Fine.", min_chars=12) == ["Hi. I'm here. Fine."]
    assert split_sentences("Hi. I'm here right now. Fine.", 25, 12) == ["Hi. I'm here right now.", "Fine."]
    assert split_sentences("   \n ") == []


def test_split_long_sentences_on_clauses_then_words():
    long = "one two three, four five six, seven eight nine ten eleven twelve"
    pieces = split_sentences(long, max_chars=30, min_chars=0)
    assert pieces == ["one two three, four five six,", "seven eight nine ten eleven", "twelve"]
    assert all(len(p) <= 30 for p in pieces) and " ".join(pieces) == long
    assert split_sentences("x" * 25, max_chars=10, min_chars=0) == ["x" * 10, "x" * 10, "x" * 5]
    words = " ".join(["word"] * 200)  # 999 characters, no punctuation
    pieces = split_sentences(words, max_chars=180)
    assert all(len(p) <= 180 for p in pieces) and " ".join(pieces) == words and len(pieces) == 6


def test_length_bound_formula():
    bound = LengthBound()  # ceil(12.5 * (3 + 2 * 0.12 * chars))
    assert bound.frames("x" * 100) == math.ceil(12.5 * (3 + 24)) == 338
    assert bound.frames("") == 38 and bound.frames("x" * 200) > 2 * bound.frames("x" * 80)
    assert max_frames("x" * 100, 2.0, bound) == 25  # max_audio_seconds overrides the bound
    with pytest.raises(SynthesisError):
        max_frames("x", 0.0, bound)


def test_wav_writer_header_valid_after_each_append(tmp_path):
    path = tmp_path / "w.wav"
    with WavWriter(path) as w:
        assert sf.info(path).frames == 0
        for n in (100, 0, 2500):
            w.append(np.full(n, 0.5, dtype=np.float32))
            data, sr = sf.read(path, dtype="int16")
            assert sr == 24_000 and data.shape == (w.num_samples,)
        w.append(np.array([2.0, -2.0]))  # clipped, not wrapped around
    data, _ = sf.read(path, dtype="int16")
    assert data.shape == (2602,) and data[0] == 16384 and data[-2:].tolist() == [32767, -32767]
    riff, data_size = (
        struct.unpack("<I", path.read_bytes()[4:8])[0],
        struct.unpack("<I", path.read_bytes()[40:44])[0],
    )
    assert (riff, data_size) == (36 + 2 * 2602, 2 * 2602)


def tiny(seed=0):
    torch.manual_seed(seed)
    model = build_model("tiny").eval()
    torch.nn.init.normal_(model.codebook0_head.weight, std=1.0)
    torch.nn.init.normal_(model.audio_head, std=1.0)
    return model


def greedy(model, frames=6):
    tokens, mask = text_rows(list(range(3, 40)))
    codes, _ = generate(model, tokens[None], mask[None], frames, SamplingConfig(top_k=1))
    return codes[0]  # [32, F]


@torch.no_grad()
def test_prepare_model_int8_keeps_fp32_weights():
    """int8 accuracy and kernel use: tests/model/test_quant.py."""
    model = prepare_model(tiny(), torch.float32, quantize="int8")
    assert "qkv" in model.backbone.layers[0].self_attn.fast and "audio_head" in model.fast
    assert model.backbone.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # fp32 kept for training
    assert greedy(model, frames=2).shape == (32, 2)
    with pytest.raises(SynthesisError, match="int3"):
        prepare_model(tiny(), torch.float32, quantize="int3")


@pytest.mark.slow  # ~70 s of inductor compilation on a 2-core CPU
def test_compile_runs_on_cpu():
    ref = greedy(tiny(), frames=2)
    model = prepare_model(tiny(), torch.float32, compile=True)
    torch._dynamo.reset()
    assert torch.equal(greedy(model, frames=2), ref)
