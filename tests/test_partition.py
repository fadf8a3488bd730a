"""Splitting a labelled data set across simulated agents (pure numpy, no MQTT)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.partition import (
    MAX_DIRICHLET_TRIES,
    PARTITIONS,
    PartitionError,
    dirichlet,
    iid,
    partition,
    shards,
)


def _digits_like(n: int = 1437, n_classes: int = 10, seed: int = 0) -> np.ndarray:
    """A shuffled label vector with near-equal classes, like digits' 1437 training labels."""
    y = np.arange(n) % n_classes
    return np.random.default_rng(seed).permutation(y).astype(np.int64)


def _assert_exact_cover(parts: list[np.ndarray], n: int, n_agents: int) -> None:
    assert len(parts) == n_agents
    allidx = np.concatenate(parts)
    assert len(allidx) == n  # no index twice ...
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))  # ... and every index once
    for p in parts:
        assert p.dtype.kind == "i"
        assert np.all(np.diff(p) > 0)  # sorted, no repeats


def _label_skew(y: np.ndarray, parts: list[np.ndarray], n_classes: int = 10) -> float:
    """Mean total-variation distance between each agent's label distribution and the global one."""
    global_p = np.bincount(y, minlength=n_classes) / len(y)
    return float(
        np.mean([0.5 * np.abs(np.bincount(y[p], minlength=n_classes) / len(p) - global_p).sum() for p in parts])
    )


class CountingRng:
    """A Generator stand-in that counts Dirichlet draws and fails instead of looping forever."""

    def __init__(self, rng: np.random.Generator, limit: int) -> None:
        self._rng = rng
        self.limit = limit
        self.calls = 0

    def shuffle(self, x):
        self._rng.shuffle(x)

    def dirichlet(self, a):
        self.calls += 1
        if self.calls > self.limit:
            raise AssertionError(f"more than {self.limit} Dirichlet draws: the retry loop is not bounded")
        return self._rng.dirichlet(a)


# ---------------------------------------------------------------------------
# coverage: every partitioner uses every index exactly once


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_iid_exact_cover_and_balanced(n, data, seed):
    n_agents = data.draw(st.integers(1, n))
    parts = iid(n, n_agents, np.random.default_rng(seed))
    _assert_exact_cover(parts, n, n_agents)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=40, deadline=None)
@given(
    n_classes=st.integers(1, 10),
    n_agents=st.integers(1, 12),
    alpha=st.floats(0.3, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_exact_cover(n_classes, n_agents, alpha, seed):
    y = _digits_like(400, n_classes, seed % 1000)
    parts = dirichlet(y, n_agents, alpha, np.random.default_rng(seed), min_samples=5)
    _assert_exact_cover(parts, len(y), n_agents)
    assert min(len(p) for p in parts) >= 5


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 400),
    n_classes=st.integers(1, 10),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_shards_exact_cover(n, n_classes, data, seed):
    spa = data.draw(st.integers(1, min(3, n)))
    n_agents = data.draw(st.integers(1, n // spa))
    y = _digits_like(n, n_classes, seed % 1000)
    parts = shards(y, n_agents, np.random.default_rng(seed), shards_per_agent=spa)
    _assert_exact_cover(parts, n, n_agents)


@pytest.mark.parametrize("kind", PARTITIONS)
def test_partition_dispatch_covers(kind):
    y = _digits_like()
    parts = partition(y, 10, kind, np.random.default_rng(0), alpha=0.5)
    _assert_exact_cover(parts, len(y), 10)


@pytest.mark.parametrize("kind", PARTITIONS)
def test_partition_is_seeded(kind):
    y = _digits_like()
    a = partition(y, 10, kind, np.random.default_rng(5), alpha=0.5)
    b = partition(y, 10, kind, np.random.default_rng(5), alpha=0.5)
    c = partition(y, 10, kind, np.random.default_rng(6), alpha=0.5)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


# ---------------------------------------------------------------------------
# iid


def test_iid_sizes():
    sizes = sorted(len(p) for p in iid(1437, 10, np.random.default_rng(0)))
    assert sizes == [143] * 3 + [144] * 7


def test_iid_has_little_label_skew():
    y = _digits_like()
    assert _label_skew(y, iid(len(y), 10, np.random.default_rng(0))) < 0.1


# ---------------------------------------------------------------------------
# dirichlet


def test_dirichlet_min_samples_respected():
    y = _digits_like()
    for seed in range(5):
        parts = dirichlet(y, 20, 0.3, np.random.default_rng(seed), min_samples=15)
        assert min(len(p) for p in parts) >= 15
        _assert_exact_cover(parts, len(y), 20)


def test_dirichlet_small_alpha_means_label_skew():
    y = _digits_like()
    skew = {
        alpha: np.mean([_label_skew(y, dirichlet(y, 10, alpha, np.random.default_rng(s))) for s in range(3)])
        for alpha in (0.1, 100.0)
    }
    # alpha = 0.1: most agents see a few classes; alpha = 100: close to iid
    assert skew[0.1] > 0.4
    assert skew[100.0] < 0.1
    assert skew[0.1] > 5 * skew[100.0]


def test_dirichlet_small_alpha_agents_miss_classes():
    y = _digits_like()
    parts = dirichlet(y, 10, 0.1, np.random.default_rng(0))
    classes_seen = [len(np.unique(y[p])) for p in parts]
    assert np.mean(classes_seen) < 7
    parts = dirichlet(y, 10, 100.0, np.random.default_rng(0))
    assert all(len(np.unique(y[p])) == 10 for p in parts)


def test_dirichlet_impossible_case_terminates():
    # FIELD-NOTES: alpha = 0.1, 50 agents, 1437 digits samples, min 10 per agent.
    y = _digits_like()
    rng = CountingRng(np.random.default_rng(0), limit=(MAX_DIRICHLET_TRIES + 1) * 10)
    start = time.monotonic()
    try:
        parts = dirichlet(y, 50, 0.1, rng, min_samples=10)
    except PartitionError as exc:
        msg = str(exc)
        assert "alpha" in msg and str(MAX_DIRICHLET_TRIES) in msg
    else:
        _assert_exact_cover(parts, len(y), 50)
        assert min(len(p) for p in parts) >= 10
    assert time.monotonic() - start < 10.0


def test_dirichlet_impossible_case_on_real_digits_labels():
    pytest.importorskip("sklearn")
    from aggregator.datasets import load_digits_split

    _, y, _, _ = load_digits_split(0)
    assert len(y) == 1437
    try:
        parts = dirichlet(y, 50, 0.1, np.random.default_rng(0), min_samples=10)
    except PartitionError:
        pass
    else:
        assert min(len(p) for p in parts) >= 10


def test_dirichlet_gives_up_after_bounded_tries(monkeypatch):
    # 40 samples, 4 agents, 10 each: with alpha = 0.01 no draw succeeds; count the draws.
    import aggregator.partition as part

    monkeypatch.setattr(part, "MAX_DIRICHLET_TRIES", 7)
    rng = CountingRng(np.random.default_rng(0), limit=1000)
    y = _digits_like(40, 2)
    with pytest.raises(PartitionError, match="7 draws"):
        part.dirichlet(y, 4, 0.01, rng, min_samples=10)
    assert rng.calls == 7 * 2  # one Dirichlet draw per class per try, and no more tries


def test_dirichlet_not_enough_samples():
    y = _digits_like(100)
    with pytest.raises(PartitionError, match="needs more than 100"):
        dirichlet(y, 11, 0.5, np.random.default_rng(0), min_samples=10)
    # n_agents * min_samples == n is not refused up front (only the draws can fail) ...
    try:
        dirichlet(y, 10, 1000.0, np.random.default_rng(0), min_samples=10)
    except PartitionError as exc:
        assert "draws" in str(exc)
    # ... and a large alpha gives a near-uniform split that meets a high minimum
    y = _digits_like(1000)
    parts = dirichlet(y, 10, 1000.0, np.random.default_rng(0), min_samples=90)
    assert min(len(p) for p in parts) >= 90
    _assert_exact_cover(parts, 1000, 10)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_alpha_must_be_positive(alpha):
    with pytest.raises(PartitionError, match="alpha"):
        dirichlet(_digits_like(), 10, alpha, np.random.default_rng(0))


# ---------------------------------------------------------------------------
# shards


def test_shards_give_few_labels_per_agent():
    y = _digits_like()
    for spa in (1, 2, 3):
        parts = shards(y, 10, np.random.default_rng(0), shards_per_agent=spa)
        for p in parts:
            # a shard of sorted labels spans at most two classes here (shards are smaller than a class)
            assert len(np.unique(y[p])) <= 2 * spa
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= spa  # shards differ by at most one sample
    parts = shards(y, 50, np.random.default_rng(0))
    assert np.mean([len(np.unique(y[p])) for p in parts]) <= 2.5
    assert _label_skew(y, parts) > 0.6


def test_shards_need_enough_samples():
    with pytest.raises(PartitionError, match="shards"):
        shards(np.zeros(5, dtype=np.int64), 3, np.random.default_rng(0), shards_per_agent=2)


# ---------------------------------------------------------------------------
# argument checks


@pytest.mark.parametrize("kind", PARTITIONS)
def test_more_agents_than_samples(kind):
    with pytest.raises(PartitionError, match="agents"):
        partition(_digits_like(5), 6, kind, np.random.default_rng(0))


@pytest.mark.parametrize("kind", PARTITIONS)
def test_zero_agents(kind):
    with pytest.raises(PartitionError, match="at least one agent"):
        partition(_digits_like(50), 0, kind, np.random.default_rng(0))


def test_partition_dispatch_passes_alpha():
    y = _digits_like()
    skewed = partition(y, 10, "dirichlet", np.random.default_rng(0), alpha=0.1)
    flat = partition(y, 10, "dirichlet", np.random.default_rng(0), alpha=100.0)
    assert _label_skew(y, skewed) > 5 * _label_skew(y, flat)


def test_unknown_kind():
    with pytest.raises(PartitionError) as info:
        partition(_digits_like(), 10, "zipf", np.random.default_rng(0))
    msg = str(info.value)
    assert "zipf" in msg and all(k in msg for k in PARTITIONS)


def test_partition_error_is_a_value_error():
    assert issubclass(PartitionError, ValueError)
