"""Adaptive sharding (paths/growth.py) and adaptive write slots (paths/slots.py): their
rules fed chosen events, then a counter growing its shards under two processes of
writers on both engines, exact throughout.
"""

from __future__ import annotations

import math
import multiprocessing
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharded_counter import Counter
from sharded_counter.paths import growth
from sharded_counter.paths.growth import ShardGrowth
from sharded_counter.paths.slots import (
    FIRST_GUESS,
    FORGET_AFTER,
    GAP_FACTOR,
    LINGER_SHARE,
    MIN_PATIENCE,
    SLOW,
    Returns,
    WriteTimes,
)


def writes(policy: ShardGrowth, n: int, *, contended: bool, start: int, maximum: int) -> list[int]:
    """Report ``n`` committed writes; the counts each change chose."""
    chosen = []
    for _ in range(n):
        if contended:
            policy.contended()
        grown = policy.wrote(start, maximum)
        if grown is not None:
            chosen.append(grown)
    return chosen


def test_contention_grows_the_count_by_half_a_step_at_a_time_up_to_the_maximum() -> None:
    policy = ShardGrowth()
    assert policy.in_use(10, 40) == 10
    assert writes(policy, growth.SETTLE - 1, contended=True, start=10, maximum=40) == []
    assert writes(policy, 1, contended=True, start=10, maximum=40) == [15]
    assert policy.in_use(10, 40) == 15
    assert writes(policy, 4 * growth.SETTLE, contended=True, start=10, maximum=40) == [23, 35, 40]
    assert writes(policy, growth.SETTLE, contended=True, start=10, maximum=40) == []  # capped
    assert policy.in_use(10, 40) == 40


def test_a_little_contention_grows_nothing() -> None:
    policy = ShardGrowth()
    for _ in range(20):  # one write in 20 meets contention: 5 %, under GROW_AT
        policy.contended()
        assert writes(policy, 1, contended=False, start=10, maximum=40) == []
        assert writes(policy, 19, contended=False, start=10, maximum=40) == []
    assert policy.in_use(10, 40) == 10


def test_quiet_shrinks_a_step_at_a_time_never_below_the_configured_count() -> None:
    policy = ShardGrowth()
    writes(policy, 2 * growth.SETTLE, contended=True, start=10, maximum=40)
    assert policy.in_use(10, 40) == 23
    assert writes(policy, growth.QUIET - 1, contended=False, start=10, maximum=40) == []
    assert writes(policy, 1, contended=False, start=10, maximum=40) == [15]
    assert writes(policy, 3 * growth.QUIET, contended=False, start=10, maximum=40) == [10]
    assert policy.in_use(10, 40) == 10


def test_the_configured_count_wins_over_a_smaller_maximum() -> None:
    policy = ShardGrowth()
    assert policy.in_use(50, 40) == 50  # max_shards below shards: no growth, no shrink
    assert writes(policy, 5 * growth.SETTLE, contended=True, start=50, maximum=40) == []
    fixed = ShardGrowth()
    assert writes(fixed, 5 * growth.SETTLE, contended=True, start=8, maximum=8) == []


@given(
    st.integers(1, 200),
    st.integers(1, 400),
    st.lists(st.booleans(), min_size=1, max_size=3000),
)
def test_the_count_stays_within_the_configured_count_and_the_maximum(
    start: int, maximum: int, met: list[bool]
) -> None:
    policy = ShardGrowth()
    ceiling = max(start, maximum)
    for contended in met:
        if contended:
            policy.contended()
        grown = policy.wrote(start, maximum)
        assert start <= policy.in_use(start, maximum) <= ceiling
        if grown is not None:
            assert grown == policy.in_use(start, maximum)
            assert grown <= math.ceil(ceiling)


def test_write_times_set_the_patience_of_a_queued_group() -> None:
    times = WriteTimes()
    assert times.patience() == SLOW * FIRST_GUESS
    for _ in range(200):
        times.took(0.004)
    assert times.usual == pytest.approx(0.004, rel=1e-3)
    assert times.patience() == pytest.approx(0.04, rel=1e-3)
    for _ in range(200):
        times.took(0.0001)
    assert times.patience() == MIN_PATIENCE  # never sooner than the floor


def test_writers_that_come_straight_back_are_waited_for() -> None:
    returns = Returns()
    assert returns.linger(0.02) == 0.0  # nobody came back yet: no reason to wait
    now = 100.0
    for _ in range(50):  # a write of "a" and "b" ends; both are back 0.2 ms later
        returns.finished(["a", "b"], now)
        assert returns.expected(now)
        returns.joined("a", now + 0.0002)
        assert returns.expected(now + 0.0002)  # "b" is still out
        returns.joined("b", now + 0.0002)
        assert not returns.expected(now + 0.0002)
        now += 0.02
    assert returns.usual_gap == pytest.approx(0.0002)
    assert returns.linger(0.02) == pytest.approx(GAP_FACTOR * 0.0002)


def test_writers_that_come_back_late_are_not_waited_for() -> None:
    # Requests arriving one by one: each writer is back long after its write ended.
    returns = Returns()
    now = 100.0
    for _ in range(50):
        returns.finished(["a"], now)
        returns.joined("a", now + 0.03)
        now += 0.05
    assert returns.linger(0.02) == 0.0


def test_a_writer_that_never_comes_back_is_forgotten() -> None:
    returns = Returns()
    returns.finished(["gone"], 100.0)
    assert returns.expected(100.0 + FORGET_AFTER / 2)
    assert not returns.expected(100.0 + FORGET_AFTER * 2)
    returns.finished(["other"], 100.0 + FORGET_AFTER * 2)  # and dropped from the books
    returns.joined("gone", 100.0 + FORGET_AFTER * 3)
    assert returns.usual_gap is None  # so its late return teaches nothing


@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=0.9), min_size=1, max_size=50),
    usual_write=st.floats(min_value=1e-4, max_value=5.0),
)
def test_the_wait_never_passes_its_share_of_a_write(gaps: list[float], usual_write: float) -> None:
    returns = Returns()
    now = 0.0
    for gap in gaps:
        returns.finished(["w"], now)
        returns.joined("w", now + gap)
        now += gap + 1.0
        assert 0.0 <= returns.linger(usual_write) <= LINGER_SHARE * usual_write


# -- on the real backends: two processes of writers on one counter ---------------------------


def _writer(env: dict[str, str], name: str, threads: int, each: int, go: Any, out: Any) -> None:
    import os
    import threading

    os.environ.update(env)
    counter = Counter(name, shards=2, max_shards=12, write_mode="transaction")
    go.wait(120)  # both processes start writing together, however long each took to start
    errors: list[str] = []

    def work() -> None:
        for _ in range(each):
            try:
                counter.increment()
            except Exception as exc:  # reported, and the test fails on it
                errors.append(repr(exc))

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put((counter.shards_in_use, counter.stats.snapshot(), errors))


@pytest.mark.backends
@pytest.mark.needs_processes
def test_two_processes_grow_a_contended_counter_and_it_stays_exact(
    sharded_counter_env: dict[str, str], sharded_counter_engine: str
) -> None:
    # Two shards and two processes of 8 threads writing in transactions: the shards are
    # leased by the other process, or abort, far more often than GROW_AT.
    name = f"grows-{sharded_counter_engine}"
    context = multiprocessing.get_context("spawn")
    go, out = context.Barrier(3), context.Queue()
    children = [
        context.Process(target=_writer, args=(dict(sharded_counter_env), name, 8, 150, go, out))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    go.wait(120)
    reports = [out.get(timeout=300) for _ in children]
    for child in children:
        child.join(60)
    counter = Counter(name)
    assert counter.get_count(nocache=True) == 2 * 8 * 150
    assert counter.count == 2 * 8 * 150
    for shards_in_use, stats, errors in reports:
        assert errors == []
        assert shards_in_use > 2, stats  # grew: 3, 5, 8, 12
        assert stats["lease_misses"] + stats["aborts"] > 0
    print(
        f"\ngrowth {sharded_counter_engine}: shards in use "
        f"{[r[0] for r in reports]}, lease misses {[r[1]['lease_misses'] for r in reports]}, "
        f"aborts {[r[1]['aborts'] for r in reports]}, writes {[r[1]['writes'] for r in reports]}"
    )
