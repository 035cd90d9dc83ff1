"""Architecture hyperparameters: plain dataclasses of primitives (they go into checkpoints as-is)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from elise.layout import AUDIO_VOCAB, NUM_CODEBOOKS

LLAMA3_ROPE_SCALING = {
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass
class TransformerConfig:
    """One Llama-3.2-style stack (no token embedding, no output layer).

    Args:
        num_layers: transformer blocks.
        dim: model width.
        num_heads / num_kv_heads: query heads and key/value heads (grouped-query attention).
        head_dim: width of one head (not always dim // num_heads: CSM's decoder uses 128 with dim 1024/8).
        mlp_hidden: SwiGLU hidden width.
        max_seq_len: positions the RoPE tables cover (2048 backbone, 33 decoder).
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE theta.
        rope_scaling: llama3 frequency scaling parameters, or None for plain RoPE.
    """

    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_hidden: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scaling: dict[str, float] | None = field(default_factory=lambda: dict(LLAMA3_ROPE_SCALING))

    def num_block_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.dim * self.mlp_hidden
        return self.num_layers * (attn + mlp + 2 * self.dim) + self.dim


@dataclass
class CSMConfig:
    """Backbone + depth decoder + embeddings and heads around them (DESIGN §1)."""

    backbone: TransformerConfig
    decoder: TransformerConfig
    text_vocab_size: int
    audio_vocab_size: int = AUDIO_VOCAB
    num_codebooks: int = NUM_CODEBOOKS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CSMConfig:
        d = dict(d)
        d.pop("name", None)
        d["backbone"] = TransformerConfig(**d["backbone"])
        d["decoder"] = TransformerConfig(**d["decoder"])
        return cls(**d)
