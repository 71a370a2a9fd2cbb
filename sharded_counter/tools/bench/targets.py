"""The performance targets of issues 4, 15, 16, 17, 19 and 28, checked against one run's numbers.

On Redis (issue 28) the targets are those of the contenders measured there: the
Counter and the keyed Counter against blind puts, from threads and from
processes, ``SharedBuffer`` from 2 x 8, and the cached read against redis-py's
bare ``GET``, with memcached's thresholds.

A missed target is reported, never hidden, but it does not fail the run:
only a wrong count does. A target whose inputs were not measured (say, no
16-thread point was asked for) is reported as not measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .results import EngineResults, Point, Timed, paired_ratio

TARGET_THREADS = 16
# What the sharded Counter must reach, as a share of blind puts, per engine.
COUNTER_VS_BLIND = {"classic": 0.5, "firestore": 0.9}
# Keyed increments (a key record written with every shard write), on both engines.
KEYED_VS_BLIND = 0.5
# BoundedCounter far from its bound against the plain Counter, on both engines (issue 16).
BOUNDED_VS_COUNTER = 0.5
# SharedBuffer.increment (memcache only) from 2 processes of 8 threads, on both engines.
SHARED_BUFFER_VS_BLIND = 5.0
BUFFER_RATE = 1_000_000.0
BUFFER_VS_DICT = 0.2
CACHED_VS_BARE_GET = 0.8
# AsyncCounter from 64 tasks in one event loop against Counter from 16 threads (issue 15).
TASKS_VS_THREADS = 1.0
# Counter from several processes on one counter, against blind puts from the same
# processes: its rate at least, its p99 latency at most this times theirs (issue 17).
LAYOUTS = ((2, 8), (4, 4))
PROCESSES_VS_BLIND = 1.0
PROCESSES_P99_VS_BLIND = 1.5
# The same figures for a counter made with the default shard count, which adaptive
# sharding grows, from a cold start: each repeat is a fresh counter, timed from its
# first increment, in a time box well under the 10 s the issue allows.
GROWTH_LAYOUT = (2, 8)


@dataclasses.dataclass(frozen=True)
class TargetResult:
    engine: str
    target: str
    measured: float | None  # None: not measured in this run
    threshold: float
    unit: str  # "x" for a ratio, "/s" for a rate
    how: str  # what was divided by what
    at_most: bool = False  # the threshold is a ceiling (a latency ratio), not a floor

    @property
    def passed(self) -> bool | None:
        if self.measured is None:
            return None
        if self.at_most:
            return self.measured <= self.threshold
        return self.measured >= self.threshold

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "not measured"}[self.passed]

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed, "verdict": self.verdict}


def _rate(measured: Point | Timed | None) -> float | None:
    return None if measured is None else measured.rate


def _vs_blind(point: Point | None) -> float | None:
    """The median over the run's repeats of the point's ratio to the blind puts of the
    same repeat (``EngineResults.summarize``)."""
    return None if point is None else point.ratio_to_blind


def _p99_ratio(measured: Point | None, base: Point | None) -> float | None:
    """The p99 latency of ``measured`` over ``base``'s, over every repeat of each."""
    if measured is None or base is None or measured.spread is None or base.spread is None:
        return None
    mine, theirs = measured.spread.latency_p99_ms, base.spread.latency_p99_ms
    return None if mine is None or not theirs else mine / theirs


def _paired(measured: Timed | None, base: Timed | None) -> float | None:
    if measured is None or base is None:
        return None
    return paired_ratio(measured.round_rates, base.round_rates, measured.rate, base.rate)


def _against_blind_puts(
    engine: str,
    results: EngineResults,
    contender: str,
    procs: int,
    each: int,
    what: str,
    how: str,
) -> list[TargetResult]:
    """Issue 17's pair for ``contender`` at ``procs`` processes of ``each`` threads: its
    rate at least the blind puts' from the same processes, its p99 at most 1.5x theirs."""
    measured = results.point(contender, each, processes=procs)
    blind = results.point("blind", each, processes=procs)
    # "Counter, 2 processes x 8 threads" -> "Counter p99, 2 processes x 8 threads"
    first, _, rest = what.partition(", ")
    return [
        TargetResult(
            engine, f"{what}, vs blind puts", _vs_blind(measured), PROCESSES_VS_BLIND, "x", how
        ),
        TargetResult(
            engine,
            f"{first} p99, {rest}, vs blind puts'",
            _p99_ratio(measured, blind),
            PROCESSES_P99_VS_BLIND,
            "x",
            f"p99 latency per increment / blind puts' p99, {procs} x {each}",
            at_most=True,
        ),
    ]


def evaluate(engines: Mapping[str, EngineResults]) -> list[TargetResult]:
    """Every target of every part of the run, each named by its key in ``engines``."""
    found: list[TargetResult] = []
    for engine, results in engines.items():
        found += _writers_vs_blind(engine, results)
        if results.cache == "memcached":
            found += _memcached_only(engine, results)
        found.append(_cached_read(engine, results))
    return found


def _writers_vs_blind(engine: str, results: EngineResults) -> list[TargetResult]:
    """The Counter, the keyed Counter and SharedBuffer against blind puts: on every cache."""
    found = [
        TargetResult(
            engine,
            f"sharded Counter, {TARGET_THREADS} writer threads, vs blind puts",
            _vs_blind(results.point("counter", TARGET_THREADS)),
            COUNTER_VS_BLIND.get(results.engine, 0.5),
            "x",
            f"Counter(shards=20) increments/s / blind puts/s at {TARGET_THREADS} threads",
        ),
        TargetResult(
            engine,
            f"keyed increments, {TARGET_THREADS} writer threads, vs blind puts",
            _vs_blind(results.point("counter-keyed", TARGET_THREADS)),
            KEYED_VS_BLIND,
            "x",
            f"Counter(shards=20) increments/s with idempotency keys / blind puts/s at "
            f"{TARGET_THREADS} threads",
        ),
    ]
    for procs, each in LAYOUTS:
        found += _against_blind_puts(
            engine,
            results,
            "counter",
            procs,
            each,
            f"Counter, {procs} processes x {each} threads",
            f"Counter(shards=20) increments/s / blind puts/s, {procs} processes x "
            f"{each} threads each",
        )
    found.append(
        TargetResult(
            engine,
            "SharedBuffer, 2 processes x 8 threads, vs blind puts",
            _vs_blind(results.point("shared-buffer", 8, processes=2)),
            SHARED_BUFFER_VS_BLIND,
            "x",
            "SharedBuffer.increment calls/s / blind puts/s, 2 processes x 8 threads each",
        )
    )
    return found


def _memcached_only(engine: str, results: EngineResults) -> list[TargetResult]:
    """The targets of what the bench measures on memcached alone."""
    found = [
        TargetResult(
            engine,
            f"BoundedCounter far from its bound, {TARGET_THREADS} threads, vs Counter",
            results.paired_points("bounded", "counter", TARGET_THREADS),
            BOUNDED_VS_COUNTER,
            "x",
            f"BoundedCounter(shards=20) increments/s / Counter(shards=20) increments/s "
            f"at {TARGET_THREADS} threads, median over repeats",
        )
    ]
    procs, each = GROWTH_LAYOUT
    found += _against_blind_puts(
        engine,
        results,
        "counter-default",
        procs,
        each,
        f"default Counter, adaptive shards, {procs} x {each}",
        f"Counter() increments/s from a cold start / blind puts/s, {procs} processes "
        f"x {each} threads each",
    )
    buffered = results.timed("buffer-increment")
    locked = results.timed("dict-under-lock")
    tasks, threads = results.timed("aio-tasks-64"), results.timed("counter-threads-16")
    found += [
        TargetResult(
            engine,
            "buffered increments, one thread",
            _rate(buffered),
            BUFFER_RATE,
            "/s",
            "CounterBuffer.increment calls/s",
        ),
        TargetResult(
            engine,
            "buffered increments vs dict under lock",
            _paired(buffered, locked),
            BUFFER_VS_DICT,
            "x",
            "CounterBuffer.increment/s / locked dict increments/s",
        ),
        TargetResult(
            engine,
            "AsyncCounter, 64 tasks, vs Counter, 16 threads",
            _paired(tasks, threads),
            TASKS_VS_THREADS,
            "x",
            "AsyncCounter increments/s (64 tasks, one event loop) / Counter increments/s "
            "(16 threads), median of paired races",
        ),
    ]
    return found


# The bare client each cache's cached read is held against (micro.BARE_LABELS).
BARE_GETS = {"memcached": "pymemcache get", "redis": "redis-py GET"}


def _cached_read(engine: str, results: EngineResults) -> TargetResult:
    """A cached ``counter.count`` against a bare client's get of one key, same server."""
    bare = BARE_GETS.get(results.cache, f"{results.cache} get")
    return TargetResult(
        engine,
        f"cached count read vs bare {bare}",
        _paired(results.timed("read-cached"), results.timed("read-bare-get")),
        CACHED_VS_BARE_GET,
        "x",
        f"counter.count reads/s / {bare}/s, one thread, median of paired rounds",
    )
