"""The 33-column row layout shared by data, model and generation (DESIGN §1).

Every sequence position ("row") holds 33 integers and 33 mask bits: columns 0..31 are Mimi
codebooks 0..31, column 32 is a text token. A text row has only column 32 unmasked, an audio row
only columns 0..31. A segment is the text rows of ``[{speaker}]{text}`` (BOS/EOS included by the
tokenizer), then its audio rows, then one end-of-speech row (an audio row of 32 zeros).
Batches are right-padded with fully masked rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

NUM_CODEBOOKS = 32
CODEBOOK_SIZE = 2048  # real Mimi codes; ids >= this are never sampled
AUDIO_VOCAB = 2051  # per-codebook vocabulary of the embedding tables and heads
TEXT_COL = 32
ROW_WIDTH = 33
EOS_CODE = 0  # the end-of-speech row is an audio row whose 32 codes are all EOS_CODE


def text_rows(text_ids: Tensor | list[int]) -> tuple[Tensor, Tensor]:
    """Rows for a tokenized text. Returns tokens [n, 33] long, mask [n, 33] bool."""
    ids = torch.as_tensor(text_ids, dtype=torch.long)
    tokens = torch.zeros(len(ids), ROW_WIDTH, dtype=torch.long)
    mask = torch.zeros(len(ids), ROW_WIDTH, dtype=torch.bool)
    tokens[:, TEXT_COL] = ids
    mask[:, TEXT_COL] = True
    return tokens, mask


def audio_rows(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Rows for Mimi codes [32, T]. Returns tokens [T, 33], mask [T, 33]."""
    assert codes.dim() == 2 and codes.shape[0] == NUM_CODEBOOKS, codes.shape
    frames = codes.shape[1]
    tokens = torch.zeros(frames, ROW_WIDTH, dtype=torch.long)
    mask = torch.zeros(frames, ROW_WIDTH, dtype=torch.bool)
    tokens[:, :NUM_CODEBOOKS] = codes.t().long()
    mask[:, :NUM_CODEBOOKS] = True
    return tokens, mask


def eos_codes(frames: int = 1) -> Tensor:
    """Codes [32, frames] of the end-of-speech row."""
    return torch.full((NUM_CODEBOOKS, frames), EOS_CODE, dtype=torch.long)


def segment_rows(
    text_ids: Tensor | list[int], codes: Tensor | None, eos: bool = True
) -> tuple[Tensor, Tensor]:
    """Text rows, then audio rows of ``codes`` [32, T] (if given), then the EOS row (if ``eos``)."""
    parts = [text_rows(text_ids)]
    if codes is not None:
        parts.append(audio_rows(codes))
    if eos:
        parts.append(audio_rows(eos_codes()))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def pad_rows(rows: list[tuple[Tensor, Tensor]], length: int | None = None) -> tuple[Tensor, Tensor]:
    """Right-pad a list of (tokens [n, 33], mask [n, 33]) to [B, S, 33] with fully masked rows."""
    length = length or max(t.shape[0] for t, _ in rows)
    tokens = torch.zeros(len(rows), length, ROW_WIDTH, dtype=torch.long)
    mask = torch.zeros(len(rows), length, ROW_WIDTH, dtype=torch.bool)
    for i, (t, m) in enumerate(rows):
        tokens[i, : t.shape[0]] = t
        mask[i, : m.shape[0]] = m
    return tokens, mask


def is_audio_row(mask: Tensor) -> Tensor:
    """[..., 33] mask -> [...] bool: the row carries audio codes."""
    return mask[..., :NUM_CODEBOOKS].any(-1)


def is_eos_row(tokens: Tensor, mask: Tensor) -> Tensor:
    """[..., 33] -> [...] bool: an audio row whose 32 codes are all the EOS code."""
    return is_audio_row(mask) & (tokens[..., :NUM_CODEBOOKS] == EOS_CODE).all(-1)
