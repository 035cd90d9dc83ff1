"""Helpers shared by the codecs: input checks, padding to whole frames, frame counts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_wav(wav: Tensor) -> None:
    """Raise ValueError unless ``wav`` is a float [B, 1, N] batch."""
    if wav.dim() != 3 or wav.shape[1] != 1 or not wav.dtype.is_floating_point:
        raise ValueError(f"codec.encode expects float audio [B, 1, N], got {tuple(wav.shape)} {wav.dtype}")


def check_codes(codes: Tensor, num_codebooks: int, cardinality: int) -> None:
    """Raise ValueError unless ``codes`` is an integer [B, num_codebooks, T] tensor of valid code ids.

    Ids >= cardinality are the model's spare vocabulary entries, not codec codes: decoding them would
    index out of the codebook (a crash on GPU), so they are rejected here with a clear message.
    """
    if codes.dim() != 3 or codes.shape[1] != num_codebooks:
        raise ValueError(f"codec.decode expects codes [B, {num_codebooks}, T], got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codec.decode expects integer codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= cardinality):
        raise ValueError(
            f"codec.decode got code ids in [{int(codes.min())}, {int(codes.max())}]; "
            f"valid ids are 0..{cardinality - 1} (ids >= {cardinality} are not codec codes)"
        )


def pad_to_frames(wav: Tensor, samples_per_frame: int) -> Tensor:
    """Right-pad [B, 1, N] with zeros to [B, 1, ceil(N / samples_per_frame) * samples_per_frame]."""
    extra = -wav.shape[-1] % samples_per_frame
    return F.pad(wav, (0, extra)) if extra else wav


def frames_from_lengths(
    lengths: Tensor | None, batch: int, num_samples: int, samples_per_frame: int
) -> Tensor:
    """Valid frame count per item: ceil(lengths / samples_per_frame); all of N when lengths is None."""
    if lengths is None:
        lengths = torch.full((batch,), num_samples, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [{batch}], got {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > num_samples):
        raise ValueError(f"lengths must lie in [0, {num_samples}], got {lengths.tolist()}")
    return (lengths + samples_per_frame - 1) // samples_per_frame  # [B]
