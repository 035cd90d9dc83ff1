"""Collate dataset items into padded [B, S, 33] row tensors (DESIGN §1 layout)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from elise.data.items import Example
from elise.layout import EOS_CODE, NUM_CODEBOOKS, ROW_WIDTH, TEXT_COL, segment_rows


def _as_item(x: dict | Example) -> dict:
    if isinstance(x, Example):
        return {"id": x.id, "text_ids": x.text_ids, "codes": x.load_codes(), "speaker": x.speaker}
    return x


def collate(batch: Sequence[dict | Example], loss_on: str = "last") -> dict:
    """Items ({id, text_ids, codes [32, T], speaker, optional context}) or Examples -> a padded batch.

    Each item becomes ``elise.layout.segment_rows(text_ids, codes, eos=True)``, right-padded
    with fully masked rows as ``elise.layout.pad_rows`` does (equality is tested); built here
    by filling one preallocated tensor, since this runs for every training batch. An item's
    ``context`` segments ({text_ids, codes}) come first, each ``segment_rows(..., eos=True)``:
    the rows of ``elise.synthesis.prompt.build_prompt`` with those segments as voice prompt.

    Returns {"tokens": [B, S, 33] long, "mask": [B, S, 33] bool, "lengths": [B] long (rows of
    each example, context included), "target": [B, S] bool (the rows whose prediction the loss
    counts: the item's own segment, or every row with ``loss_on="all"``), "ids": list[str],
    "speakers": [B] long}.
    """
    if len(batch) == 0:
        raise ValueError("collate got an empty batch")
    items = [_as_item(x) for x in batch]
    context = [
        [segment_rows(c["text_ids"], torch.as_tensor(c["codes"]), eos=True) for c in it.get("context", ())]
        for it in items
    ]
    n_ctx = [sum(int(t.shape[0]) for t, _ in rows) for rows in context]
    n_text = [len(it["text_ids"]) for it in items]
    n_audio = [int(it["codes"].shape[1]) for it in items]
    lengths = torch.tensor(
        [c + t + a + 1 for c, t, a in zip(n_ctx, n_text, n_audio, strict=True)], dtype=torch.long
    )  # [B]
    B, S = len(items), int(lengths.max())
    tokens = torch.zeros(B, S, ROW_WIDTH, dtype=torch.long)  # [B, S, 33]
    mask = torch.zeros(B, S, ROW_WIDTH, dtype=torch.bool)  # [B, S, 33]
    target = torch.zeros(B, S, dtype=torch.bool)  # [B, S]
    for i, it in enumerate(items):
        o, t, a = n_ctx[i], n_text[i], n_audio[i]
        codes = torch.as_tensor(it["codes"])
        if codes.dim() != 2 or codes.shape[0] != NUM_CODEBOOKS:
            raise ValueError(f"item {it['id']}: codes must be [{NUM_CODEBOOKS}, T], got {list(codes.shape)}")
        if o:
            tokens[i, :o] = torch.cat([r[0] for r in context[i]])  # [o, 33]
            mask[i, :o] = torch.cat([r[1] for r in context[i]])
        tokens[i, o : o + t, TEXT_COL] = torch.as_tensor(it["text_ids"], dtype=torch.long)  # [t]
        mask[i, o : o + t, TEXT_COL] = True
        tokens[i, o + t : o + t + a, :NUM_CODEBOOKS] = codes.t()  # [a, 32]
        tokens[i, o + t + a, :NUM_CODEBOOKS] = EOS_CODE  # the end-of-speech row
        mask[i, o + t : o + t + a + 1, :NUM_CODEBOOKS] = True  # audio rows + EOS row
        start = 0 if loss_on == "all" else o
        target[i, start : o + t + a + 1] = True
    speakers = torch.tensor([int(it.get("speaker", 0)) for it in items], dtype=torch.long)  # [B]
    return {
        "tokens": tokens,
        "mask": mask,
        "lengths": lengths,
        "target": target,
        "ids": [str(it["id"]) for it in items],
        "speakers": speakers,
    }
