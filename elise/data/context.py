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


class ContextPlanner:
    """Chooses the context clips of every example of an epoch: ``plan(epoch)[i]`` is a tuple of
    indices into ``examples`` (in the order they precede example ``i``), empty for most when p < 1."""

    def __init__(self, examples: Sequence[Example], settings: ContextSettings, seed: int = 0):
        self.settings, self.seed = settings, int(seed)
        self.lengths = np.asarray([e.num_rows for e in examples], dtype=np.int64)  # [N]
        pools: dict[tuple[int, str | None], list[int]] = {}
        for i, e in enumerate(examples):
            pools.setdefault((e.speaker, e.group), []).append(i)
        self._pools = {key: np.asarray(idx, dtype=np.int64) for key, idx in pools.items()}
        self._pool_of = [self._pools[(e.speaker, e.group)] for e in examples]

    def check(self) -> None:
        """Raise ContextError when no example could ever get a context (p > 0 would do nothing)."""
        if not self.settings.active or len(self.lengths) == 0:
            return
        pairs = [np.sort(self.lengths[idx])[:2].sum() for idx in self._pools.values() if len(idx) >= 2]
        if not pairs:
            raise ContextError(
                f"data.context.p={self.settings.p} needs two training clips of one speaker (and group); "
                "every speaker has one: set data.context.p=0"
            )
        if min(pairs) > self.settings.max_rows:
            raise ContextError(
                f"data.context.max_rows={self.settings.max_rows} is too small for any context: the shortest "
                f"two clips of one speaker take {int(min(pairs))} rows; raise data.context.max_rows "
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
        for i in np.flatnonzero(use).tolist():
            pool = self._pool_of[i]
            budget = s.max_rows - int(self.lengths[i])
            chosen: list[int] = []
            for j in pool[(draws[i] * len(pool)).astype(np.int64)].tolist():
                if j != i and j not in chosen and self.lengths[j] <= budget:
                    chosen.append(j)
                    budget -= int(self.lengths[j])
                    if len(chosen) == want[i]:
                        break
            plan[i] = tuple(chosen)
        return plan

    def rows(self, plan: Sequence[tuple[int, ...]]) -> np.ndarray:
        """[N] rows of each example with its context."""
        extra = np.asarray([int(self.lengths[list(c)].sum()) if c else 0 for c in plan], dtype=np.int64)
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
