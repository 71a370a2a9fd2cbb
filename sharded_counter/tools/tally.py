"""What one writer thread saw while racing, kept apart so the hot loop takes no lock.

The demo and the bench both race writers until a deadline; this is their
writer loop and how its outcomes are counted, so both count them the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable

from ..errors import CacheUnavailable, IncrementNotRecorded


@dataclasses.dataclass
class WriterTally:
    acked: int = 0  # increments acknowledged (increment() returned)
    # Increments refused, nothing of them stored: IncrementNotRecorded, or a
    # CacheUnavailable that says so (a SharedBuffer increment whose cas kept losing).
    not_recorded: int = 0
    # Earlier acknowledged amounts that an IncrementNotRecorded handed back to its caller.
    returned: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    # Seconds each acknowledged call took, when calls are timed one by one (batch 1).
    latencies: list[float] = dataclasses.field(default_factory=list)

    @property
    def expected(self) -> int:
        """What these writes must have added to the count."""
        return self.acked - self.returned

    def write_until(
        self,
        increment: Callable[[], object],
        deadline: float,
        *,
        batch: int = 1,
        stop: threading.Event | None = None,
    ) -> None:
        """Call ``increment`` until ``time.monotonic()`` reaches ``deadline`` or ``stop`` is set.

        Checked every ``batch`` calls, so a fast ``increment`` is not slowed by
        the clock. A call that starts before the deadline may end after it; it
        counts if it succeeded.
        """
        clock = time.monotonic
        stopped = stop.is_set if stop is not None else _never
        # Timing every call of a sub-microsecond increment (a buffer's) would cost more
        # than the call; those run in batches, and only single calls are timed.
        timer = time.perf_counter if batch == 1 else None
        took = self.latencies.append
        while clock() < deadline and not stopped():
            for _ in range(batch):
                began = timer() if timer is not None else 0.0
                try:
                    increment()
                except IncrementNotRecorded as exc:
                    self.not_recorded += 1
                    self.returned += exc.delta - 1
                except CacheUnavailable as exc:
                    if exc.maybe_applied:  # sent, unanswered: the outcome is unknown
                        self.errors[type(exc).__name__] += 1
                    else:
                        self.not_recorded += 1
                except Exception as exc:  # counted and shown: racing is about what goes wrong
                    self.errors[type(exc).__name__] += 1
                else:
                    self.acked += 1
                    if timer is not None:
                        took(timer() - began)

    @classmethod
    def total(cls, tallies: Iterable[WriterTally]) -> WriterTally:
        """All the writers' tallies as one, once they have stopped."""
        total = cls()
        for tally in tallies:
            total.acked += tally.acked
            total.not_recorded += tally.not_recorded
            total.returned += tally.returned
            total.errors.update(tally.errors)
            total.latencies.extend(tally.latencies)
        return total


def _never() -> bool:
    return False
