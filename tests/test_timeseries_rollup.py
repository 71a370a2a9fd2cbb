"""A time series' rollup when Datastore fails: the amount stays where it was, or the
move is finished later under the same idempotency key, counted once (issue 26).

Real memcached and real emulators on both engines; Datastore refuses (a port where
nothing listens) or stalls (the emulator's JVM SIGSTOPped). One test fakes a write
that landed and whose reply was lost, which no real fault produces on cue.
Time is the test's clock (buckets and move deadlines); memcached's expiries are
real and far away (an hour and more).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from sharded_counter import (
    Counter,
    IncrementNotRecorded,
    IncrementOutcomeUnknown,
    TimeSeries,
)
from sharded_counter.core.validation import INTERNAL_PREFIX
from sharded_counter_emulator import free_port

pytestmark = pytest.mark.backends

# A Datastore that is down: no retries worth waiting for, and quick to say so.
UNREACHABLE: dict[str, Any] = {"retry_attempts": 1, "retry_deadline": 0.5, "rpc_timeout": 1.0}
RESOLUTIONS = [(60, 3600)]


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _series(name: str, clock: FakeClock, **counter_options: Any) -> TimeSeries:
    return TimeSeries(
        name,
        RESOLUTIONS,
        durable=True,
        clock=clock,
        counter_options=counter_options or None,
    )


def _filled(name: str) -> tuple[TimeSeries, FakeClock, float]:
    """A series with 7 in one complete minute bucket and 5 in the next."""
    clock = FakeClock(time.time() // 60 * 60)
    series = _series(name, clock)
    series.incr("k", 7, at=clock.now - 170)
    series.incr("k", 5, at=clock.now - 110)
    return series, clock, clock.now - 180


def _in_counters(series: TimeSeries, start: float) -> int:
    res = series.resolutions[0]
    return sum(
        series._bucket_counter("k", res, int(start) + 60 * i).get_count(nocache=True)
        for i in range(3)
    )


def test_a_refused_rollup_leaves_every_amount_in_its_bucket(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    series, clock, start = _filled("rollup-refused")
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = _series("rollup-refused", clock, **UNREACHABLE)
        with pytest.raises(IncrementNotRecorded):
            broken.rollup("k")
    assert _in_counters(series, start) == 0
    # Nothing was zeroed: the memcache buckets still hold all of it.
    assert series.series("k", start, start + 180, 60)[:2] == [(start, 7), (start + 60, 5)]
    # Datastore back: the next rollup moves each bucket once, and the sum is unchanged.
    assert series.rollup("k") == 12
    assert series.rollup("k") == 0
    assert series.sum("k", start, start + 180) == 12
    assert _in_counters(series, start) == 12


def test_a_stalled_rollup_is_finished_later_and_counted_once(
    sharded_counter_env: dict[str, str],
    sharded_counter_backends: Any,
    sharded_counter_engine: str,
) -> None:
    """The emulator stalls mid-rollup: the write fails either way (not recorded, or
    outcome unknown: it may land when the emulator runs again). A later rollup, past
    the failed mover's deadline, finishes the move with the same key."""
    series, clock, start = _filled("rollup-stalled")
    # Connected and probed before the fault, on the backend the bucket counters share
    # (their rpc_timeout is part of what a backend is shared by), with default retries.
    Counter("rollup-stalled-probe", rpc_timeout=UNREACHABLE["rpc_timeout"]).increment()
    stalled = _series("rollup-stalled", clock, **UNREACHABLE)
    emulator = sharded_counter_backends.emulator(sharded_counter_engine)
    emulator.pause()
    try:
        with pytest.raises((IncrementNotRecorded, IncrementOutcomeUnknown)):
            stalled.rollup("k")
    finally:
        emulator.resume()
    clock.now += 60  # past the failed mover's deadline (4.5 s here), in the test's time
    series.rollup("k")
    series.rollup("k")  # nothing left to move: a second rollup changes nothing
    assert _in_counters(series, start) == 12
    assert series.sum("k", start, start + 180) == 12


def test_a_rollup_whose_write_landed_unseen_is_not_counted_twice(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Faked: the bucket counter's write lands and its reply is lost (the real write
    runs, then IncrementOutcomeUnknown is raised), which no real fault does on cue."""
    series, clock, start = _filled("rollup-landed")
    real_increment = Counter.increment
    lost: list[int] = []

    def landed_then_lost(counter: Counter, delta: int = 1, **kwargs: Any) -> None:
        real_increment(counter, delta, **kwargs)
        if not lost:
            lost.append(delta)
            raise IncrementOutcomeUnknown(counter.name, delta, TimeoutError("reply lost"))

    with monkeypatch.context() as patch:
        patch.setattr(Counter, "increment", landed_then_lost)
        with pytest.raises(IncrementOutcomeUnknown):
            series.rollup("k")
    assert lost == [7]
    # Until the record's deadline passes, its mover may still be at it: left alone.
    series.rollup("k")
    assert _in_counters(series, start) == 7 + 5
    clock.now += 60
    series.rollup("k")  # finishes the first move under its key: the 7 counts once
    assert _in_counters(series, start) == 12
    assert series.sum("k", start, start + 180) == 12


def test_no_user_counter_shares_a_bucket_counter(sharded_counter_env: dict[str, str]) -> None:
    series, _clock, start = _filled("rollup-names")
    assert series.rollup("k") == 12
    bucket = series._bucket_counter("k", series.resolutions[0], int(start))
    assert bucket.name.startswith(INTERNAL_PREFIX) and bucket.count == 7
    # The old form of the name is a user's counter of its own, untouched by the rollup.
    assert Counter(f"ts:60:{int(start)}:12:rollup-names:k").get_count(nocache=True) == 0
    with pytest.raises(ValueError, match="library's own"):
        Counter(str(bucket.name))  # the same text, from a user: refused
