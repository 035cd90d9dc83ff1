"""Records passed between preparation (sources + code cache) and batching."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass
class Example:
    """One prepared clip: its text ids and where its Mimi codes are: a [32, T] int16 ``.npy`` file, or
    ``row`` of an Arrow shard / pre-encoded file (``codes_format``: ``<column>:<layout>``, see
    ``elise.data.shards``)."""

    id: str
    text: str
    speaker: int
    text_ids: list[int]
    codes_path: str
    frames: int
    split: str = "train"  # "train" | "val"
    group: str | None = None  # conversation/session id when the source gives one (context clips come from it)
    row: int | None = None  # row of ``codes_path`` when it is an Arrow file
    codes_format: str = "codes:bytes"

    @property
    def num_rows(self) -> int:
        """Rows of its segment: text rows + audio rows + the EOS row."""
        return len(self.text_ids) + self.frames + 1

    def load_codes(self) -> Tensor:
        """Codes [32, frames] long."""
        if self.row is None:
            return torch.from_numpy(np.load(self.codes_path).astype(np.int64))
        from elise.data.shards import read_codes

        column, layout = self.codes_format.split(":")
        codes = read_codes(self.codes_path, self.row, column, layout)  # a view of the file
        return torch.from_numpy(np.array(codes, dtype=np.int64))  # the one copy


@dataclass
class PreparedData:
    """What ``elise.data.prepare`` returns: kept examples (both splits) and the bad-data report."""

    examples: list[Example]
    report: dict = field(default_factory=dict)
    cache_dir: Path | None = None
    index: Path | None = None  # the clip index (``elise.data.shards``) of the shard store

    def split(self, name: str) -> list[Example]:
        return [e for e in self.examples if e.split == name]
