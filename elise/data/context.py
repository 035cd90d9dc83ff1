"""Training on context segments (``data.context``): an example preceded by other clips of its speaker.

Synthesis builds multi-segment prompts (a voice-prompt clip with its transcript, earlier sentences,
earlier turns), so training shows the model the same thing: with probability ``p`` a training
example is preceded by 1..``max_segments`` other clips of the same speaker (of the same group,
i.e. conversation/session, when the source gives one), each laid out as a whole segment (text
rows, audio rows, EOS row: ``elise.layout.segment_rows``, the layout of
``elise.synthesis.prompt.build_prompt``), the whole example within ``max_rows`` rows. The loss
counts only the target segment (``loss_on: last``) or every segment (``loss_on: all``).

The choice is made by ``ContextPlanner`` from ``(seed, epoch)`` alone, so every rank makes the same
choice and a resumed run makes the one it made before; ``ContextBatchSampler`` packs batches with
the context rows counted and yields ``(index, context indices)`` pairs, which ``CodesDataset``
loads.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from elise.data.items import Example
from elise.data.sampler import TokenBudgetBatchSampler

LOSS_ON = ("last", "all")
_DRAWS = 4  # candidate clips drawn per wanted context segment


class ContextError(ValueError):
    """A ``data.context`` setting that cannot work (one line, names the setting)."""


@dataclass(frozen=True)
class ContextSettings:
    """``data.context``: probability ``p``, up to ``max_segments`` clips, ``max_rows`` rows per
    example (context + target), loss on the ``last`` segment or on ``all``."""

    p: float = 0.0
    max_segments: int = 2
    max_rows: int = 5000
    loss_on: str = "last"

    @property
    def active(self) -> bool:
        return self.p > 0

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any] | None, max_tokens: int) -> ContextSettings:
        """Checked settings; ``max_rows`` null means ``data.max_tokens``. Raises ContextError."""
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"p", "max_segments", "max_rows", "loss_on"}
        if unknown:
            raise ContextError(
                f"unknown data.context key(s) {sorted(unknown)}; use p, max_segments, max_rows, loss_on"
            )

        def given(key: str, default: Any) -> Any:  # an explicit 0 is a value to check, not "unset"
            value = cfg.get(key)
            return default if value is None else value

        p = float(given("p", 0.0))
        k = int(given("max_segments", 2))
        max_rows = int(given("max_rows", max_tokens))
        loss_on = str(given("loss_on", "last"))
        if not 0.0 <= p <= 1.0:
            raise ContextError(f"data.context.p={p} must be a probability in [0, 1]")
        if k < 1:
            raise ContextError(f"data.context.max_segments={k} must be >= 1")
        if loss_on not in LOSS_ON:
            raise ContextError(f"data.context.loss_on={loss_on!r} must be one of {', '.join(LOSS_ON)}")
        if max_rows > max_tokens:
            raise ContextError(
                f"data.context.max_rows={max_rows} exceeds data.max_tokens={max_tokens} (the rows of a whole batch); "
                "lower data.context.max_rows or raise data.max_tokens"
            )
        return cls(p, k, max_rows, loss_on)


def context_keys(examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([N] rows, [N] speaker, [N] group number (-1: none)) of a list of examples; an index-backed
    dataset gives the same from its columns (``elise.data.dataset.IndexDataset.context_keys``)."""
    groups: dict[str, int] = {}
    lengths = np.fromiter((e.num_rows for e in examples), dtype=np.int64, count=len(examples))
    speakers = np.fromiter((e.speaker for e in examples), dtype=np.int64, count=len(examples))
    group = np.fromiter(
        (-1 if e.group is None else groups.setdefault(e.group, len(groups)) for e in examples),
        dtype=np.int64,
        count=len(examples),
    )
    return lengths, speakers, group


class ContextPlanner:
    """Chooses the context clips of every example of an epoch: ``plan(epoch)[i]`` is a tuple of
    indices into ``examples`` (in the order they precede example ``i``), empty for most when p < 1.

    ``examples``: a list of examples, or a dataset with ``context_keys()`` (an index-backed one:
    its columns, no record per clip). The pools (clips of one speaker and group) are grouped with
    numpy: ``members[start[k]:start[k + 1]]`` are pool ``k``'s clips in index order.
    """

    def __init__(self, examples: Sequence[Example] | Any, settings: ContextSettings, seed: int = 0):
        self.settings, self.seed = settings, int(seed)
        keys = examples.context_keys() if hasattr(examples, "context_keys") else context_keys(examples)
        lengths, speakers, groups = keys
        self.lengths = np.asarray(lengths, dtype=np.int64)  # [N]
        groups = np.asarray(groups, dtype=np.int64) + 1  # [N] 0: no group
        key = np.asarray(speakers, dtype=np.int64) * (int(groups.max(initial=0)) + 1) + groups  # [N]
        _, pool = np.unique(key, return_inverse=True)
        self._pool = pool.reshape(-1).astype(np.int64)  # [N] pool of each clip
        self._members = np.argsort(self._pool, kind="stable")  # [N] clips by pool, index order within
        sizes = np.bincount(self._pool) if len(self._pool) else np.zeros(0, dtype=np.int64)
        self._start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [P + 1]

    def _pool_of(self, i: int) -> np.ndarray:
        k = self._pool[i]
        return self._members[self._start[k] : self._start[k + 1]]

    def check(self) -> None:
        """Raise ContextError when no example could ever get a context (p > 0 would do nothing)."""
        if not self.settings.active or len(self.lengths) == 0:
            return
        order = np.lexsort((self.lengths, self._pool))  # by pool, then rows
        sizes = np.diff(self._start)  # [P]
        first = self._start[:-1][sizes >= 2]  # position of each pool of 2+ clips in ``order``
        if not len(first):
            raise ContextError(
                f"data.context.p={self.settings.p} needs two training clips of one speaker (and group); "
                "every speaker has one: set data.context.p=0"
            )
        shortest = int((self.lengths[order[first]] + self.lengths[order[first + 1]]).min())
        if shortest > self.settings.max_rows:
            raise ContextError(
                f"data.context.max_rows={self.settings.max_rows} is too small for any context: the shortest "
                f"two clips of one speaker take {shortest} rows; raise data.context.max_rows "
                "(and data.max_tokens) or set data.context.p=0"
            )

    def plan(self, epoch: int) -> list[tuple[int, ...]]:
        """Context indices of every example in ``epoch`` (deterministic in seed and epoch)."""
        n, s = len(self.lengths), self.settings
        plan: list[tuple[int, ...]] = [()] * n
        if not s.active or n == 0:
            return plan
        rng = np.random.default_rng([self.seed, int(epoch), 2])
        use = rng.random(n) < s.p  # [N]
        want = rng.integers(1, s.max_segments + 1, size=n)  # [N]
        draws = rng.random((n, _DRAWS * s.max_segments))  # [N, D] positions in the example's pool
        # each used example scans its D drawn pool members in order and keeps a member that is not
        # itself, not yet chosen and fits the row budget, until it has ``want``: one column at a time
        # for all of them at once
        used = np.flatnonzero(use)  # [U]
        pool = self._pool[used]  # [U]
        size = self._start[pool + 1] - self._start[pool]  # [U]
        cand = self._members[
            self._start[pool][:, None] + (draws[used] * size[:, None]).astype(np.int64)
        ]  # [U, D]
        budget = s.max_rows - self.lengths[used]  # [U]
        chosen = np.full((len(used), s.max_segments), -1, dtype=np.int64)  # [U, K]
        count = np.zeros(len(used), dtype=np.int64)  # [U]
        rows = np.arange(len(used))
        for d in range(cand.shape[1]):
            j = cand[:, d]  # [U]
            ok = (j != used) & (count < want[used]) & (self.lengths[j] <= budget)
            ok &= ~(chosen == j[:, None]).any(axis=1)
            chosen[rows[ok], count[ok]] = j[ok]
            budget = np.where(ok, budget - self.lengths[j], budget)
            count += ok
        for i, c, k in zip(used.tolist(), chosen.tolist(), count.tolist(), strict=True):
            plan[i] = tuple(c[:k])
        return plan

    def rows(self, plan: Sequence[tuple[int, ...]]) -> np.ndarray:
        """[N] rows of each example with its context."""
        sizes = np.fromiter(map(len, plan), np.int64, len(plan))  # [N] context clips per example
        flat = np.fromiter(itertools.chain.from_iterable(plan), np.int64, int(sizes.sum()))  # [sum]
        extra = np.zeros(len(plan), dtype=np.int64)
        np.add.at(
            extra, np.repeat(np.arange(len(plan)), sizes), self.lengths[flat]
        )  # one pass, no per-item numpy
        return self.lengths + extra


class ContextBatchSampler(TokenBudgetBatchSampler):
    """``TokenBudgetBatchSampler`` whose items carry context: batches of ``(index, context indices)``.

    Each epoch's packing uses that epoch's rows (target + context), so the ``max_tokens`` budget
    holds. The batch count per epoch comes from the context-aware packings of 4 epochs (+ 0.5%);
    an epoch that would need more batches trains without context (the plain sorted packing, which
    always fits). Same count on every rank, same resume state as the parent.
    """

    def __init__(self, lengths: Sequence[int], planner: ContextPlanner, **kwargs: Any):
        self.planner = planner
        super().__init__(lengths, **kwargs)
        if self.shuffle:
            packed = [len(self._pack_windows(e, self.planner.rows(self.planner.plan(e)))) for e in range(4)]
            n = max([len(self._sorted_batches), *packed])
            n += n // 200
            self._total = -(-n // self.num_replicas) * self.num_replicas

    def _epoch_plan(self, epoch: int) -> tuple[list[list[int]], list[tuple[int, ...]]]:
        """All batches of ``epoch`` (every rank, in order) and the context of every item."""
        plan = self.planner.plan(epoch)
        if not self.shuffle:
            return self._split_to(self._sorted_batches, self._total), [()] * len(plan)
        rng = np.random.default_rng([self.seed, epoch, 1])
        batches = self._pack_windows(epoch, self.planner.rows(plan))
        if len(batches) > self._total:  # rare: this epoch's contexts pack badly; train it without
            batches, plan = self._sorted_batches, [()] * len(plan)
        batches = self._split_to(batches, self._total)
        return [batches[j] for j in rng.permutation(len(batches))], plan

    def _epoch_batches(self, epoch: int) -> list[list[tuple[int, tuple[int, ...]]]]:  # type: ignore[override]
        batches, plan = self._epoch_plan(epoch)
        return [[(i, plan[i]) for i in b] for b in batches]

    def padding_fraction(self, epoch: int = 0) -> float:
        batches, plan = self._epoch_plan(epoch)
        rows = self.planner.rows(plan)
        used = sum(int(rows[b].sum()) for b in batches)
        total = sum(len(b) * int(rows[b].max()) for b in batches)
        return 1.0 - used / max(total, 1)
