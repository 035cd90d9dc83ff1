"""Token-budget batch sampler: length-bucketed, rank-aware, resumable (DESIGN §2 "Batching")."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


def _dist_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"bad DDP setup: rank {rank} of {num_replicas} replicas")
    return num_replicas, rank


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of indices with at most ``max_samples`` items and ``max_tokens`` rows, padding counted.

    Not lhotse's DynamicBucketingSampler: it needs lhotse CutSets and budgets seconds of audio,
    while our items are prepared code files indexed by position and the budget is padded rows.

    A batch costs ``len(batch) * longest`` rows (the padded [B, S, 33] tensor). Each epoch
    (shuffle=True) the items are permuted with ``seed + epoch``, cut into windows of
    ``bucket_size`` items, sorted by length inside each window and packed greedily, then the
    batch order is shuffled. shuffle=False packs the globally sorted items, in order.

    Every epoch has the same number of batches (Lightning reads ``len`` once): the count of a
    reference packing (the largest of the sorted one and 4 random epochs, + 0.5%); an epoch that packs into fewer batches splits its largest batches, one
    that needs more falls back to the (never larger) globally sorted packing, order shuffled.
    Under DDP the count is rounded up to a multiple of ``num_replicas`` the same way, by
    splitting batches, so every rank gets as many batches as the others, the ranks' batches are
    disjoint and every item is seen exactly once per epoch (no repeats, nothing dropped). Only
    when there are fewer items than batches needed are whole batches repeated.

    Items longer than ``max_tokens`` can never fit a batch: they are excluded at construction,
    counted in ``excluded`` (their indices) with one warning.

    Exact resume: ``state_dict()`` holds the epoch and the batches already yielded in it;
    after ``load_state_dict`` the next iteration starts at the next batch of that epoch.
    ``set_epoch`` with a different epoch starts that epoch from its first batch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int = 5000,
        max_samples: int = 16,
        shuffle: bool = True,
        seed: int = 0,
        bucket_size: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if max_tokens < 1 or max_samples < 1:
            raise ValueError(f"max_tokens and max_samples must be >= 1, got {max_tokens}, {max_samples}")
        self.num_replicas, self.rank = _dist_defaults(num_replicas, rank)
        self.lengths = np.asarray(lengths, dtype=np.int64)  # [N]
        self.max_tokens, self.max_samples = int(max_tokens), int(max_samples)
        self.shuffle, self.seed = shuffle, int(seed)
        # Windows of ~32 full batches: padding stays low (see tests) while batch composition still
        # changes from epoch to epoch.
        self.bucket_size = int(bucket_size or 32 * self.max_samples)
        too_long = self.lengths > self.max_tokens
        self.excluded = np.flatnonzero(too_long).tolist()
        if self.excluded:
            warnings.warn(
                f"{len(self.excluded)} item(s) longer than max_tokens={self.max_tokens} rows can't fit a batch "
                f"and are excluded (longest {int(self.lengths.max())} rows)",
                stacklevel=2,
            )
        self._kept = np.flatnonzero(~too_long)  # [K] indices that can be batched
        self.epoch = 0
        self._resume_at = 0  # batches of `self.epoch` to skip at the next __iter__
        self._yielded = 0  # batches of `self.epoch` yielded so far
        self._sorted_batches = self._pack(self._sorted(self._kept))
        n = len(self._sorted_batches)
        if shuffle:  # reference: the largest of the sorted packing and a few random ones, + 0.5%
            n = max([n] + [len(self._pack_windows(e)) for e in range(4)])
            n += n // 200
        self._total = -(-n // self.num_replicas) * self.num_replicas  # multiple of num_replicas

    # ---- packing -------------------------------------------------------------------------

    def _sorted(self, idx: np.ndarray) -> np.ndarray:
        return idx[np.argsort(self.lengths[idx], kind="stable")]

    def _pack(self, order: np.ndarray, lengths: np.ndarray | None = None) -> list[list[int]]:
        """Greedy packing of indices sorted by ascending length (each new item is the longest)."""
        lengths = self.lengths if lengths is None else lengths
        batches: list[list[int]] = []
        cur: list[int] = []
        for i, n in zip(order.tolist(), lengths[order].tolist(), strict=True):
            if cur and (len(cur) + 1 > self.max_samples or (len(cur) + 1) * n > self.max_tokens):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    def _pack_windows(self, epoch: int, lengths: np.ndarray | None = None) -> list[list[int]]:
        """Permute with ``seed + epoch``, sort windows of ``bucket_size`` by ``lengths``, pack each."""
        lengths = self.lengths if lengths is None else lengths
        rng = np.random.default_rng(self.seed + epoch)
        perm = rng.permutation(self._kept)
        batches = []
        for start in range(0, len(perm), self.bucket_size):
            window = perm[start : start + self.bucket_size]
            batches += self._pack(window[np.argsort(lengths[window], kind="stable")], lengths)
        return batches

    @staticmethod
    def _split_to(batches: list[list[int]], target: int) -> list[list[int]]:
        """Split the largest batches in two until there are ``target`` (halves fit any budget)."""
        batches = list(batches)
        while len(batches) < target:
            big = max(range(len(batches)), key=lambda j: len(batches[j]))
            if len(batches[big]) < 2:  # fewer items than batches needed: repeat whole batches
                batches += [list(b) for b in batches[: target - len(batches)]]
                break
            b = batches[big]
            batches[big : big + 1] = [b[: len(b) // 2], b[len(b) // 2 :]]
        return batches

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` (every rank), exactly ``self._total`` of them."""
        if not self.shuffle:
            return self._split_to(self._sorted_batches, self._total)
        rng = np.random.default_rng([self.seed, epoch, 1])
        batches = self._pack_windows(epoch)
        if len(batches) > self._total:  # rare: this permutation packs badly
            batches = self._sorted_batches
        batches = self._split_to(batches, self._total)
        return [batches[j] for j in rng.permutation(len(batches))]

    # ---- Sampler API ---------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per rank per epoch."""
        return self._total // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._epoch_batches(self.epoch)[self.rank :: self.num_replicas]
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        for batch in mine[start:]:
            self._yielded += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop at each epoch start; a new epoch starts at its first batch."""
        if epoch != self.epoch:
            self.epoch, self._resume_at, self._yielded = int(epoch), 0, 0

    @property
    def sampler(self) -> TokenBudgetBatchSampler:
        """Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` (fabric _set_sampler_epoch)."""
        return self

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches_yielded": self._yielded,
            "num_batches": len(self),
            "num_replicas": self.num_replicas,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at batch ``batches_yielded`` of ``epoch``; a state from another setup restarts the epoch."""
        self.epoch = int(state["epoch"])
        done = int(state.get("batches_yielded", 0))
        same = all(
            state.get(k, v) == v
            for k, v in (("num_batches", len(self)), ("num_replicas", self.num_replicas), ("seed", self.seed))
        )
        if not same:
            warnings.warn(
                "batch sampler state is from another dataset/seed/world size; restarting its epoch "
                f"{self.epoch} from the first batch",
                stacklevel=2,
            )
            done = 0
        self._resume_at = self._yielded = min(done, len(self))

    def padding_fraction(self, epoch: int = 0) -> float:
        """Padding rows / total rows over all batches of ``epoch`` (all ranks)."""
        batches = self._epoch_batches(epoch)
        used = sum(int(self.lengths[b].sum()) for b in batches)
        total = sum(len(b) * int(self.lengths[b].max()) for b in batches)
        return 1.0 - used / max(total, 1)
