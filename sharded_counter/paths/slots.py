"""When a queued group of increments may open a write slot of its own.

A process writes a counter through one write at a time, and everything that
arrives meanwhile waits to go out as the next write, of the group's sum
(combiner.py). One write in flight makes the groups as large as they can be,
and every write saved is a round trip, a transaction and client CPU saved, and
one write less against the one-write-per-second-per-entity budget of a
shard. What one slot cannot do is get past a slow write: a transaction that
aborted and backs off, or one that waits for another process's lock on its
shard, holds up every increment queued behind it. So a group that has waited
``patience()`` without a slot freeing opens one more, up to
``max_concurrent_writes``. Ten times the usual write time, because three
times went around ordinary jitter and the extra writes cost more than they
saved: at 4 processes x 4 threads on the classic emulator (medians of 3
runs) 1,157/s against 1,551/s with one write at most; with ten times, in a
later pair of runs, 1,277/s against 1,238/s.

The earlier rule, a write at once whenever fewer than ``max_concurrent_writes``
ran, formed no groups at all when a process had no more writers than slots:
docs/how-it-works.md (*Group commit*) has the measurements.

Both combiners (threads and tasks) ask the same ``WriteTimes``.
"""

from __future__ import annotations

#: Before any write of the counter finished here: a guess at how long one takes.
FIRST_GUESS = 0.02
#: How much each finished write moves the estimate (an exponential moving average).
WEIGHT = 0.1
#: A write that has taken this many times the usual is slow enough to go around.
SLOW = 10.0
#: Never go around a write sooner than this (seconds): timer and scheduling noise.
MIN_PATIENCE = 0.02


class WriteTimes:
    """How long this counter's writes usually take in this process, and so how long a
    queued group waits for a slot before it opens one of its own."""

    def __init__(self) -> None:
        self.usual = FIRST_GUESS

    def took(self, seconds: float) -> None:
        """A write finished after ``seconds`` (whatever its outcome)."""
        self.usual += WEIGHT * (seconds - self.usual)

    def patience(self) -> float:
        """Seconds a queued group waits for a slot to free before it opens another."""
        return max(MIN_PATIENCE, SLOW * self.usual)
