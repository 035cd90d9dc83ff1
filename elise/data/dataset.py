"""Map-style datasets over prepared examples: load each item's cached Mimi codes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from elise.data.context import context_keys
from elise.data.items import Example
from elise.data.shards import ClipIndex
from elise.layout import NUM_CODEBOOKS


class CodesDataset(Dataset):
    """``dataset[i]`` -> {"id", "text_ids", "codes" [32, T] long, "speaker"} of ``examples[i]``.

    ``dataset[(i, (j, k))]`` (what ``elise.data.context.ContextBatchSampler`` yields) adds
    ``"context"``: the {"id", "text_ids", "codes"} of examples j, k, the segments that precede i.
    """

    def __init__(self, examples: list[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        """Rows of each item's segment (text + audio + EOS), for the batch sampler."""
        return [e.num_rows for e in self.examples]

    def context_keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """([N] rows, [N] speaker, [N] group number, -1 for none): what context planning groups by."""
        return context_keys(self.examples)

    def __getitem__(self, index: int | tuple[int, tuple[int, ...]]) -> dict:
        if isinstance(index, tuple):
            target, context = index
            item = self._load(target)
            item["context"] = [self._load(j) for j in context]
            return item
        return self._load(index)

    def _load(self, index: int) -> dict:
        ex = self.examples[index]
        try:
            codes = ex.load_codes()  # [32, T]
        except Exception as err:  # a corrupt/missing cache file: one clear line, not a numpy traceback
            raise RuntimeError(f"cannot load codes of item {ex.id!r} from {ex.codes_path}: {err}") from None
        if codes.dim() != 2 or codes.shape[0] != NUM_CODEBOOKS or codes.shape[1] != ex.frames:
            raise RuntimeError(
                f"codes of item {ex.id!r} in {ex.codes_path} have shape {list(codes.shape)}, "
                f"expected [{NUM_CODEBOOKS}, {ex.frames}]; delete the file to re-encode it"
            )
        return {"id": ex.id, "text_ids": ex.text_ids, "codes": codes, "speaker": ex.speaker}


class _IndexExamples(Sequence[Example]):
    """The clips of one split of a ``ClipIndex`` as ``Example`` records, built when accessed."""

    def __init__(self, index: ClipIndex, positions: np.ndarray, split: str):
        self.clips, self.positions, self.split = index, positions, split

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        c = self.clips.clip(int(self.positions[i]))
        fmt = f"{self.clips.meta['column']}:{self.clips.meta['layout']}"
        return Example(
            c["id"], c["text"], c["speaker"], c["text_ids"], c["codes_path"], c["frames"], self.split,
            c["group"], c["row"], fmt,
        )  # fmt: skip


class IndexDataset(CodesDataset):
    """``CodesDataset`` over one split of a memory-mapped clip index (``elise.data.shards``).

    Holds the split's positions and row counts (two integer arrays); every other field of a clip
    and its codes are read when the clip is loaded.
    """

    def __init__(self, index: ClipIndex, split: str):
        val = index.column("val")
        self.index = index
        self.positions = np.flatnonzero(val if split == "val" else ~val)  # [N] rows of the index
        self._lengths = index.column("rows")[self.positions]  # [N]
        self.examples = _IndexExamples(index, self.positions, split)  # type: ignore[assignment]

    @property
    def lengths(self) -> np.ndarray:  # type: ignore[override]
        return self._lengths

    def context_keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """([N] rows, [N] speaker, [N] group number, -1 for none) of the split's clips, from the
        index's columns (what ``elise.data.context.ContextPlanner`` groups by)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        table = self.index.table
        speakers = table.column("speaker").to_numpy()[self.positions]
        groups = table.column("group")
        if groups.null_count == len(groups):
            numbers = np.full(len(self.positions), -1, dtype=np.int64)
        else:
            codes = pc.dictionary_encode(groups).combine_chunks().indices  # [rows] null where no group
            numbers = pc.fill_null(codes, -1).cast(pa.int64()).to_numpy()[self.positions]
        return self._lengths, speakers, numbers
