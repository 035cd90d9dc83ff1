"""The train/val split: a seeded hash of each clip id (``assign_splits``), shared by preparation and
pre-encoded data."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np


def unit_hash(text: str) -> float:
    """A number in [0, 1) from the sha256 of ``text``."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) / 2.0**64


def split_scores(ids: Iterable[str], seed: int = 0) -> np.ndarray:
    """[N] the split hash of each id (float64 in [0, 1))."""
    return np.fromiter((unit_hash(f"{seed}:{i}") for i in ids), dtype=np.float64)


def val_mask(
    ids: Sequence[str],
    scores: np.ndarray,
    val_fraction: float = 0.05,
    val_count: int | None = None,
) -> np.ndarray:
    """[N] bool, True for the val ids: the rule of ``assign_splits`` over ids and their ``scores``."""
    n = len(ids)
    mask = np.zeros(n, dtype=bool)
    if n < 2:
        return mask
    if val_count is not None:  # the smallest (score, id) pairs
        order = np.lexsort((np.asarray(ids, dtype=str), scores))
        mask[order[: min(max(int(val_count), 0), n - 1)]] = True
        return mask
    mask = scores < float(val_fraction)
    if not mask.any() and float(val_fraction) > 0:
        mask[_extreme(ids, scores, last=False)] = True
    if mask.all():
        mask[_extreme(ids, scores, last=True)] = False
    return mask


def _extreme(ids: Sequence[str], scores: np.ndarray, last: bool) -> int:
    """Position of the smallest (``last``: largest) (score, id) pair."""
    ties = np.flatnonzero(scores == (scores.max() if last else scores.min())).tolist()
    pick = max if last else min
    return pick(ties, key=lambda k: ids[k])


def assign_splits(
    ids: Iterable[str], val_fraction: float = 0.05, val_count: int | None = None, seed: int = 0
) -> dict[str, str]:
    """``id -> "train" | "val"`` by a seeded hash of each id.

    With ``val_fraction`` an id is in val when its hash (a number in [0, 1)) is below the fraction,
    whatever the other ids are, so adding or skipping items never moves it. With ``val_count`` the
    ids with the smallest hashes are val. At least one val item (and one train item) is kept when
    there are two or more ids, unless ``val_fraction`` or ``val_count`` is explicitly 0.
    """
    ids = list(ids)
    mask = val_mask(ids, split_scores(ids, seed), val_fraction, val_count)
    return {i: "val" if v else "train" for i, v in zip(ids, mask.tolist(), strict=True)}
