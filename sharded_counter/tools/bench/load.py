"""Writers racing until a deadline, each with its own tally so the hot loop takes no lock."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

from ..tally import WriterTally


@dataclasses.dataclass(frozen=True)
class Load:
    """What the writers did in one timed span."""

    acked: int  # calls that returned normally
    expected: int  # what the count must now be
    not_recorded: int  # calls that raised IncrementNotRecorded (the caller still owns them)
    errors: dict[str, int]  # any other exception, by type: each makes the outcome unknown
    elapsed: float  # from the start signal until every writer stopped and settle() returned
    # Seconds per acknowledged increment, every one (empty for batched contenders).
    latencies: tuple[float, ...] = dataclasses.field(default=(), repr=False)


def drive(
    increment: Callable[[], None],
    threads: int,
    seconds: float,
    *,
    batch: int = 1,
    settle: Callable[[], None] | None = None,
) -> Load:
    """Call ``increment`` from ``threads`` threads for ``seconds``, then ``settle()``.

    Every thread starts at the same signal. A call that begins before the
    deadline may end after it; it counts, and so does the time it took.
    """
    tallies = [WriterTally() for _ in range(threads)]
    go = threading.Event()
    deadline: list[float] = []  # set just before the start signal

    def write(tally: WriterTally) -> None:
        go.wait()
        tally.write_until(increment, deadline[0], batch=batch)

    workers = [
        threading.Thread(target=write, args=(tally,), name=f"bench-writer-{i}", daemon=True)
        for i, tally in enumerate(tallies)
    ]
    for worker in workers:
        worker.start()
    start = time.monotonic()
    deadline.append(start + seconds)
    go.set()
    for worker in workers:
        worker.join()
    if settle is not None:
        settle()
    elapsed = time.monotonic() - start
    total = WriterTally.total(tallies)
    return Load(
        acked=total.acked,
        expected=total.expected,
        not_recorded=total.not_recorded,
        errors=dict(total.errors),
        elapsed=elapsed,
        latencies=tuple(total.latencies),
    )


def combine(loads: list[Load], elapsed: float) -> Load:
    """Several processes' loads as one, over the span that held them all."""
    errors: collections.Counter[str] = collections.Counter()
    for load in loads:
        errors.update(load.errors)
    return Load(
        acked=sum(load.acked for load in loads),
        expected=sum(load.expected for load in loads),
        not_recorded=sum(load.not_recorded for load in loads),
        errors=dict(errors),
        elapsed=elapsed,
        latencies=tuple(latency for load in loads for latency in load.latencies),
    )
