"""The CSM/Marvis model: text + audio embeddings, backbone, depth decoder, heads (DESIGN §1)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elise.layout import NUM_CODEBOOKS, TEXT_COL
from elise.model.blocks import Transformer, fast_path
from elise.model.config import CSMConfig


class CSM(nn.Module):
    """Backbone over 33-column rows predicts codebook 0 of the next row; the depth decoder predicts
    codebooks 1..31 of that row from [h_t, emb_0(c_0), ..., emb_30(c_30)]."""

    audio_offsets: Tensor  # [num_codebooks] buffer (register_buffer), declared for type checkers

    def __init__(self, cfg: CSMConfig):
        super().__init__()
        self.cfg = cfg
        db, dd, v = cfg.backbone.dim, cfg.decoder.dim, cfg.audio_vocab_size
        self.text_embeddings = nn.Embedding(cfg.text_vocab_size, db)
        # one table for all codebooks: code c of codebook k is row c + k * audio_vocab_size (tied with the decoder)
        self.audio_embeddings = nn.Embedding(cfg.num_codebooks * v, db)
        self.backbone = Transformer(cfg.backbone)
        self.decoder = Transformer(cfg.decoder)
        self.projection = nn.Linear(db, dd, bias=False)
        self.codebook0_head = nn.Linear(db, v, bias=False)
        self.audio_head = nn.Parameter(torch.empty(cfg.num_codebooks - 1, dd, v))
        self.register_buffer("audio_offsets", torch.arange(cfg.num_codebooks) * v, persistent=False)
        # inference-only matmuls (elise.model.quant): "projection", "codebook0_head", "audio_head"
        self.fast: dict[str, Callable[..., Tensor]] = {}
        self.reset_parameters()

    def fuse(self) -> CSM:
        """Inference speed-up: fused q/k/v and gate/up matmuls in both stacks (see Transformer.fuse)."""
        self.backbone.fuse()
        self.decoder.fuse()
        return self

    def compile_steps(self, backend: str = "inductor", mode: str | None = None) -> CSM:
        """Compile the one-frame decode steps of both stacks (see Transformer.compile_step)."""
        self.backbone.compile_step(backend, mode)
        self.decoder.compile_step(backend, mode)
        return self

    def reset_parameters(self) -> None:
        """From-scratch init: embeddings N(0, 1/sqrt(d)), block linears N(0, 0.02), heads zero
        (so the initial loss is ln(2051) = 7.63 on every codebook)."""
        for emb in (self.text_embeddings, self.audio_embeddings):
            nn.init.normal_(emb.weight, std=1 / math.sqrt(emb.weight.shape[1]))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.codebook0_head.weight)
        nn.init.zeros_(self.audio_head)

    # ---- embeddings -------------------------------------------------------------------------------
    def embed_rows(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """tokens, mask [B, S, 33] -> [B, S, d_backbone]: sum of the embeddings of the unmasked columns."""
        b, s, _ = tokens.shape
        text = self.text_embeddings(tokens[..., TEXT_COL]) * mask[..., TEXT_COL, None]  # [B, S, D]
        ids = (tokens[..., :NUM_CODEBOOKS] + self.audio_offsets).reshape(b * s, NUM_CODEBOOKS)  # [B*S, 32]
        weights = (
            mask[..., :NUM_CODEBOOKS].reshape(b * s, NUM_CODEBOOKS).to(self.audio_embeddings.weight.dtype)
        )
        # embedding_bag sums the 32 rows without materialising [B, S, 32, D]
        audio = F.embedding_bag(ids, self.audio_embeddings.weight, per_sample_weights=weights, mode="sum")
        return text + audio.view(b, s, -1).to(text.dtype)

    def embed_codes(self, codes: Tensor, codebooks: Tensor | slice) -> Tensor:
        """Per-codebook embeddings: codes [..., K] of codebooks ``codebooks`` -> [..., K, d_backbone]."""
        return self.audio_embeddings(codes + self.audio_offsets[codebooks])

    # ---- forward passes ---------------------------------------------------------------------------
    def backbone_hidden(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Full (uncached, causal) backbone pass: [B, S, 33] -> hidden [B, S, d_backbone]."""
        return self.backbone(self.embed_rows(tokens, mask))

    def decoder_logits(self, h: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced depth decoder over N frames.

        h [N, d_backbone] hidden states that predict the frames; codes [N, 32] the true frames.
        Returns logits [N, 31, audio_vocab] for codebooks 1..31 (a view of ``decoder_logits_by_codebook``).
        """
        return self.decoder_logits_by_codebook(h, codes).transpose(0, 1)

    def decoder_logits_by_codebook(self, h: Tensor, codes: Tensor) -> Tensor:
        """As ``decoder_logits`` but codebook-major, logits [31, N, V]: one batched matmul against the 31
        heads, and the layout the loss reads without copying the (large) logits tensor."""
        emb = self.embed_codes(codes[:, :-1], slice(0, NUM_CODEBOOKS - 1))  # [N, 31, Db]
        x = torch.cat([h.unsqueeze(1), emb], dim=1)  # [N, 32, Db]
        out = self.decoder(self.projection(x))  # [N, 32, Dd]
        # output position k (1..31) times audio_head[k-1] predicts c_k
        return torch.bmm(out[:, 1:].transpose(0, 1), self.audio_head)  # [31, N, V]

    # ---- single steps (generation) ----------------------------------------------------------------
    def project(self, x: Tensor) -> Tensor:
        """Backbone width -> decoder width: [..., Db] -> [..., Dd]."""
        return (fast_path(self, "projection") or self.projection)(x)

    def codebook0_logits(self, h: Tensor) -> Tensor:
        """h [B, Db] -> logits [B, V] of codebook 0."""
        return (fast_path(self, "codebook0_head") or self.codebook0_head)(h)

    def codebook_logits(self, x: Tensor, k: int) -> Tensor:
        """Decoder output x [B, Dd] at position k (1..31) -> logits [B, V] of codebook k."""
        head = fast_path(self, "audio_head")
        return x @ self.audio_head[k - 1] if head is None else head(x, k - 1)

    def num_params(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        parts = {
            "backbone_blocks": count(self.backbone),
            "decoder_blocks": count(self.decoder),
            "text_embeddings": count(self.text_embeddings),
            "audio_embeddings": count(self.audio_embeddings),
            "projection": count(self.projection),
            "codebook0_head": count(self.codebook0_head),
            "audio_head": self.audio_head.numel(),
        }
        parts["total"] = sum(parts.values())
        return parts
