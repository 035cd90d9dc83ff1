"""Fixtures of the evaluation tests: tiny random-weight Whisper and WavLM models saved locally (the hub
code paths load them exactly as they load a hub id). Plain helpers: evalkit.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight ``WhisperForConditionalGeneration`` + processor with a byte-level vocabulary."""
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    root = tmp_path_factory.mktemp("tiny_whisper")
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab |= {s: len(vocab) + i for i, s in enumerate(specials)}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = WhisperTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(root)
    eot, sot = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_target_positions=32, decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(config)
    model.generation_config.max_length = 8
    model.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_wavlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight ``WavLMForXVector`` + its feature extractor."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    root = tmp_path_factory.mktemp("tiny_wavlm")
    config = WavLMConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        tdnn_dim=(8, 8), tdnn_kernel=(3, 1), tdnn_dilation=(1, 1), xvector_output_dim=12, num_buckets=32,
        max_bucket_distance=64,
    )  # fmt: skip
    WavLMForXVector(config).save_pretrained(root)
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(root)
    return root
