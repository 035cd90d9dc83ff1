"""Records passed between preparation (sources + code cache) and batching."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass
class Example:
    """One prepared clip: its text ids and the path of its cached Mimi codes ([32, T] int16 .npy)."""

    id: str
    text: str
    speaker: int
    text_ids: list[int]
    codes_path: str
    frames: int
    split: str = "train"  # "train" | "val"
    group: str | None = None  # conversation/session id when the source gives one (context clips come from it)

    @property
    def num_rows(self) -> int:
        """Rows of its segment: text rows + audio rows + the EOS row."""
        return len(self.text_ids) + self.frames + 1

    def load_codes(self) -> Tensor:
        """Codes [32, frames] long."""
        return torch.from_numpy(np.load(self.codes_path).astype(np.int64))


@dataclass
class PreparedData:
    """What ``elise.data.prepare`` returns: kept examples (both splits) and the bad-data report."""

    examples: list[Example]
    report: dict = field(default_factory=dict)
    cache_dir: Path | None = None

    def split(self, name: str) -> list[Example]:
        return [e for e in self.examples if e.split == name]
