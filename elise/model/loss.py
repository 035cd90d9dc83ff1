"""Training loss (DESIGN §1): backbone CE on codebook 0 of the next row + amortized decoder CE.

The hidden state at row t predicts row t+1 (the well-known off-by-one): every row t whose next
row is an audio row (the EOS row included, or EOS never fires at inference) is a backbone target.
The decoder trains on a random subset of those frames (``decoder_fraction``). Vectorized: no
Python loop over codebooks or frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from elise.layout import NUM_CODEBOOKS, is_audio_row
from elise.model.csm import CSM


@dataclass
class LossOutput:
    """Scalars for the optimiser and the logs, plus what per-codebook metrics need.

    ``preds0/target0`` [N] are codebook 0 over all target frames; ``preds/targets`` [M, 31] are
    codebooks 1..31 over the decoder's frames; ``per_codebook_loss`` [32] (mean CE per codebook).
    """

    loss: Tensor
    backbone_loss: Tensor
    decoder_loss: Tensor
    per_codebook_loss: Tensor
    preds0: Tensor
    target0: Tensor
    preds: Tensor
    targets: Tensor
    num_frames: int
    num_decoder_frames: int


def select_decoder_frames(
    num_frames: int, fraction: float, generator: torch.Generator | None, device
) -> Tensor:
    """Indices of the frames the decoder trains on: ceil(fraction * N) of them, at least 1, at random."""
    if fraction >= 1.0 or num_frames == 0:
        return torch.arange(num_frames, device=device)
    # round() first: 0.1 * 30 is 3.0000000000000004 in floating point, whose ceil would be 4
    k = max(1, math.ceil(round(fraction * num_frames, 9)))
    perm = torch.randperm(
        num_frames, generator=generator, device="cpu" if generator is None else generator.device
    )
    return perm[:k].sort().values.to(device)


def csm_loss(
    model: CSM,
    tokens: Tensor,
    mask: Tensor,
    decoder_fraction: float = 1 / 16,
    backbone_weight: float = 1.0,
    decoder_weight: float = 1.0,
    generator: torch.Generator | None = None,
    target: Tensor | None = None,
) -> LossOutput:
    """tokens, mask [B, S, 33] (right-padded) -> LossOutput.

    ``target`` [B, S] bool (``batch["target"]``): only audio rows marked there are predicted in the
    loss (context segments are seen, not scored); None scores every audio row.
    """
    h = model.backbone_hidden(tokens, mask)  # [B, S, Db]
    target_rows = is_audio_row(mask[:, 1:])  # [B, S-1]: row t+1 is audio
    if target is not None:
        target_rows = target_rows & target[:, 1:]
    h_t = h[:, :-1][target_rows]  # [N, Db]
    frames = tokens[:, 1:][target_rows][:, :NUM_CODEBOOKS]  # [N, 32] the true next frames
    n = frames.shape[0]

    logits0 = model.codebook0_head(h_t).float()  # [N, V]
    ce0 = F.cross_entropy(logits0, frames[:, 0], reduction="none")  # [N]
    backbone_loss = ce0.mean()

    idx = select_decoder_frames(n, decoder_fraction, generator, h.device)  # [M]
    logits = model.decoder_logits_by_codebook(h_t[idx], frames[idx]).float()  # [31, M, V]
    targets = frames[idx, 1:]  # [M, 31]
    v = logits.shape[-1]
    # codebook-major throughout: no transposed copy of the [31, M, V] logits
    ce = F.cross_entropy(logits.reshape(-1, v), targets.t().reshape(-1), reduction="none").view(
        31, -1
    )  # [31, M]
    decoder_loss = ce.mean()

    per_cb = torch.cat([backbone_loss.detach().reshape(1), ce.detach().mean(1)])  # [32]
    return LossOutput(
        loss=backbone_weight * backbone_loss + decoder_weight * decoder_loss,
        backbone_loss=backbone_loss,
        decoder_loss=decoder_loss,
        per_codebook_loss=per_cb,
        preds0=logits0.detach().argmax(-1),
        target0=frames[:, 0],
        preds=logits.detach().argmax(-1).t(),  # [M, 31]
        targets=targets,
        num_frames=n,
        num_decoder_frames=int(idx.numel()),
    )
