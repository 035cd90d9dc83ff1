"""Collate dataset items into padded [B, S, 33] row tensors (DESIGN §1 layout)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from elise.data.items import Example
from elise.layout import EOS_CODE, NUM_CODEBOOKS, ROW_WIDTH, TEXT_COL


def _as_item(x: dict | Example) -> dict:
    if isinstance(x, Example):
        return {"id": x.id, "text_ids": x.text_ids, "codes": x.load_codes(), "speaker": x.speaker}
    return x


def collate(batch: Sequence[dict | Example]) -> dict:
    """Items ({id, text_ids, codes [32, T], speaker}) or Examples -> a padded batch.

    Each item becomes ``elise.layout.segment_rows(text_ids, codes, eos=True)``, right-padded
    with fully masked rows as ``elise.layout.pad_rows`` does (equality is tested); built here
    by filling one preallocated tensor, since this runs for every training batch.

    Returns {"tokens": [B, S, 33] long, "mask": [B, S, 33] bool, "lengths": [B] long (rows of
    each segment), "ids": list[str], "speakers": [B] long}.
    """
    if len(batch) == 0:
        raise ValueError("collate got an empty batch")
    items = [_as_item(x) for x in batch]
    n_text = [len(it["text_ids"]) for it in items]
    n_audio = [int(it["codes"].shape[1]) for it in items]
    lengths = torch.tensor([t + a + 1 for t, a in zip(n_text, n_audio, strict=True)], dtype=torch.long)  # [B]
    B, S = len(items), int(lengths.max())
    tokens = torch.zeros(B, S, ROW_WIDTH, dtype=torch.long)  # [B, S, 33]
    mask = torch.zeros(B, S, ROW_WIDTH, dtype=torch.bool)  # [B, S, 33]
    for i, it in enumerate(items):
        t, a = n_text[i], n_audio[i]
        codes = torch.as_tensor(it["codes"])
        if codes.dim() != 2 or codes.shape[0] != NUM_CODEBOOKS:
            raise ValueError(f"item {it['id']}: codes must be [{NUM_CODEBOOKS}, T], got {list(codes.shape)}")
        tokens[i, :t, TEXT_COL] = torch.as_tensor(it["text_ids"], dtype=torch.long)  # [t]
        mask[i, :t, TEXT_COL] = True
        tokens[i, t : t + a, :NUM_CODEBOOKS] = codes.t()  # [a, 32]
        tokens[i, t + a, :NUM_CODEBOOKS] = EOS_CODE  # the end-of-speech row
        mask[i, t : t + a + 1, :NUM_CODEBOOKS] = True  # audio rows + EOS row
    speakers = torch.tensor([int(it.get("speaker", 0)) for it in items], dtype=torch.long)  # [B]
    return {
        "tokens": tokens,
        "mask": mask,
        "lengths": lengths,
        "ids": [str(it["id"]) for it in items],
        "speakers": speakers,
    }
