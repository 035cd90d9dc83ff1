"""TokenBudgetBatchSampler: budgets, coverage, DDP ranks, determinism, exact resume, padding."""

from __future__ import annotations

import numpy as np
import pytest

from elise.data.sampler import TokenBudgetBatchSampler


def _lengths(n: int = 600, lo: int = 5, hi: int = 400, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, n)


def _realistic(n: int = 1195, seed: int = 0) -> np.ndarray:
    """Elise-like: text 20-120 rows + audio 12-125 frames + the EOS row."""
    rng = np.random.default_rng(seed)
    return rng.integers(20, 121, n) + rng.integers(12, 126, n) + 1


def _epoch(sampler: TokenBudgetBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize(("max_tokens", "max_samples"), [(5000, 16), (1000, 8), (350, 64)])
@pytest.mark.parametrize("replicas", [1, 3])
def test_batches_respect_budget_with_padding_counted(
    max_tokens: int, max_samples: int, replicas: int
) -> None:
    lengths = _lengths()
    for rank in range(replicas):
        s = TokenBudgetBatchSampler(lengths, max_tokens, max_samples, num_replicas=replicas, rank=rank)
        for epoch in range(2):
            batches = _epoch(s, epoch)
            assert len(batches) == len(s) > 0
            for b in batches:
                assert 1 <= len(b) <= max_samples
                assert len(b) * lengths[b].max() <= max_tokens


def test_every_item_exactly_once_per_epoch_on_one_rank() -> None:
    lengths = _lengths()
    for shuffle in (True, False):
        s = TokenBudgetBatchSampler(lengths, 2000, 16, shuffle=shuffle)
        for epoch in range(3):
            seen = sorted(i for b in _epoch(s, epoch) for i in b)
            assert seen == list(range(len(lengths)))


def test_too_long_items_are_excluded_and_counted() -> None:
    lengths = np.array([10, 500, 20, 999, 30])
    with pytest.warns(UserWarning, match="2 item"):
        s = TokenBudgetBatchSampler(lengths, max_tokens=100, max_samples=4)
    assert s.excluded == [1, 3]
    assert sorted(i for b in s for i in b) == [0, 2, 4]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_get_equal_counts_disjoint_batches_covering_the_data(world: int, shuffle: bool) -> None:
    lengths = _lengths(n=601)
    per_rank = []
    for rank in range(world):
        s = TokenBudgetBatchSampler(lengths, 1500, 16, shuffle=shuffle, seed=3, num_replicas=world, rank=rank)
        per_rank.append(_epoch(s, 2))
        assert len(per_rank[-1]) == len(s)
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    items = [i for batches in per_rank for b in batches for i in b]
    assert sorted(items) == list(range(len(lengths)))  # disjoint ranks, union = everything, no repeats


def test_fewer_items_than_ranks_repeats_batches() -> None:
    batches = [list(TokenBudgetBatchSampler([7], num_replicas=2, rank=r)) for r in range(2)]
    assert batches == [[[0]], [[0]]]


def test_empty_and_bad_arguments() -> None:
    s = TokenBudgetBatchSampler([])
    assert len(s) == 0 and list(s) == []
    with pytest.raises(ValueError, match="rank 2 of 2"):
        TokenBudgetBatchSampler([5], num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgetBatchSampler([5], max_tokens=0)


def test_deterministic_given_seed_and_epoch_and_different_across_epochs() -> None:
    lengths = _lengths()
    a, b = TokenBudgetBatchSampler(lengths, seed=1), TokenBudgetBatchSampler(lengths, seed=1)
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 1) == _epoch(b, 1)
    assert _epoch(a, 0) != _epoch(a, 1)
    assert _epoch(a, 0) != _epoch(TokenBudgetBatchSampler(lengths, seed=2), 0)
    assert list(a) == list(a)  # same epoch, same order until set_epoch changes it
    val = TokenBudgetBatchSampler(lengths, shuffle=False)
    assert _epoch(val, 0) == _epoch(val, 5)


def test_batch_count_is_constant_across_epochs_when_tokens_bind() -> None:
    lengths = _lengths(n=3000, lo=50, hi=2000, seed=4)  # the row budget, not max_samples, binds
    s = TokenBudgetBatchSampler(lengths, 5000, 16)
    for epoch in range(20):
        batches = _epoch(s, epoch)
        assert len(batches) == len(s)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def test_split_to_keeps_items_and_reaches_target() -> None:
    out = TokenBudgetBatchSampler._split_to([[0, 1, 2, 3], [4], [5, 6]], 5)
    assert len(out) == 5 and sorted(i for b in out for i in b) == list(range(7))


@pytest.mark.parametrize("stop", [0, 7, 30])
def test_exact_resume_mid_epoch(stop: int) -> None:
    lengths = _lengths()
    full = _epoch(TokenBudgetBatchSampler(lengths, 1500, 16, seed=5), 1)
    s = TokenBudgetBatchSampler(lengths, 1500, 16, seed=5)
    s.set_epoch(1)
    it = iter(s)
    head = [next(it) for _ in range(stop)]
    state = s.state_dict()
    assert state["epoch"] == 1 and state["batches_yielded"] == stop

    resumed = TokenBudgetBatchSampler(lengths, 1500, 16, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the training loop sets the same epoch again: the position must survive
    assert head + list(resumed) == full
    assert resumed.state_dict()["batches_yielded"] == len(full)
    resumed.set_epoch(2)  # the next epoch starts from its first batch
    assert len(list(resumed)) == len(resumed)


def test_state_from_another_setup_restarts_the_epoch() -> None:
    lengths = _lengths()
    s = TokenBudgetBatchSampler(lengths, seed=5)
    with pytest.warns(UserWarning, match="another dataset"):
        s.load_state_dict({"epoch": 3, "batches_yielded": 4, "num_batches": 1, "num_replicas": 1, "seed": 5})
    assert s.epoch == 3 and len(list(s)) == len(s)


def test_padding_fraction_on_elise_like_lengths() -> None:
    lengths = _realistic()
    train = TokenBudgetBatchSampler(lengths, 5000, 16)
    fractions = [train.padding_fraction(e) for e in range(3)]
    assert max(fractions) < 0.05, fractions  # measured ~0.026
    assert TokenBudgetBatchSampler(lengths, 5000, 16, shuffle=False).padding_fraction() < 0.015
    assert len(train) == 75  # 1195 / 16 rounded up: max_samples binds (16 * 246 rows < 5000)
