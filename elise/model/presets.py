"""Size presets: no-argument builders over the one general config (torchtune-style)."""

from __future__ import annotations

from elise.model.config import CSMConfig, TransformerConfig


def marvis_250m() -> CSMConfig:
    """Marvis TTS 250M: 6 x 1536 backbone (~261.9M) + 4 x 1024 decoder (~60.8M), SmolLM2 text vocab."""
    return CSMConfig(
        backbone=TransformerConfig(6, 1536, 12, 3, 128, 8192, max_seq_len=2048),
        decoder=TransformerConfig(4, 1024, 8, 2, 128, 4096, max_seq_len=33),
        text_vocab_size=49_152,
    )


def csm_1b() -> CSMConfig:
    """Sesame CSM-1B: 16 x 2048 backbone (~973M) + 4 x 1024 decoder (~111M), Llama-3.2 text vocab."""
    return CSMConfig(
        backbone=TransformerConfig(16, 2048, 32, 8, 64, 8192, max_seq_len=2048),
        decoder=TransformerConfig(4, 1024, 8, 2, 128, 8192, max_seq_len=33),
        text_vocab_size=128_256,
    )


def tiny() -> CSMConfig:
    """Test/demo size: 2-layer blocks, byte-level text vocab (259)."""
    return CSMConfig(
        backbone=TransformerConfig(2, 128, 4, 2, 32, 256, max_seq_len=2048),
        decoder=TransformerConfig(2, 64, 4, 2, 16, 128, max_seq_len=33),
        text_vocab_size=259,
    )


PRESETS = {"tiny": tiny, "marvis_250m": marvis_250m, "csm_1b": csm_1b}


def preset(name: str) -> CSMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
