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

Writers that come straight back (``Returns``). A writer that loops (a task
worker counting each message, a batch job) is back with its next increment
as soon as its write returns; meanwhile the group queued behind that write was
handed the slot and closed, so with one write in flight a process of T such
writers made groups of about T/2: the half in flight, and the half queued.
Like PostgreSQL's ``commit_delay``, which waits before a flush only while
``commit_siblings`` other transactions are active, a group about to begin its
write waits a moment for the members of the write that just finished, only
while they are known to come back quickly: their usual gap between a write's
end and their next increment is short next to a write (``linger``). Writers
that come back later than that, as requests arriving one by one do, are never
waited for, so a group then begins at once, as it always did. At 4 processes
x 4 threads on the classic emulator a write then carried 3.5-3.7 increments
instead of about 2.5 (docs/how-it-works.md, *Group commit*).

Both combiners (threads and tasks) ask the same ``WriteTimes`` and ``Returns``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

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


#: How much each rejoin moves the usual gap (an exponential moving average).
GAP_WEIGHT = 0.1
#: A group waits for returning writers up to this many of their usual gaps...
GAP_FACTOR = 3.0
#: ...and only when that is at most this share of the usual write time: waiting
#: longer would cost more latency than a larger group saves.
LINGER_SHARE = 0.25
#: A writer not back this long after its write is no longer expected (seconds).
FORGET_AFTER = 1.0


class Returns:
    """The writers of one counter expected back soon, and how soon they usually are.

    ``finished`` names the members of a write that just ended; ``joined`` notes
    one of them arriving with its next increment. Pure bookkeeping: the
    combiners hold their own lock around it and pass the clock in."""

    def __init__(self) -> None:
        self._out: dict[Hashable, float] = {}  # writer -> when its write ended
        self.usual_gap: float | None = None  # None until a writer came back once

    def finished(self, writers: Iterable[Hashable], now: float) -> None:
        """A write of ``writers`` ended at ``now``; each may come back."""
        if self._out and next(iter(self._out.values())) < now - FORGET_AFTER:
            self._out = {w: t for w, t in self._out.items() if t >= now - FORGET_AFTER}
        for writer in writers:
            self._out.pop(writer, None)  # re-inserted: the dict stays in order of ending
            self._out[writer] = now

    def joined(self, writer: Hashable, now: float) -> None:
        """``writer`` arrived with an increment at ``now``."""
        ended = self._out.pop(writer, None)
        if ended is None or now - ended > FORGET_AFTER:
            return  # not from a recent write: no gap to learn from
        gap = now - ended
        self.usual_gap = (
            gap if self.usual_gap is None else self.usual_gap + GAP_WEIGHT * (gap - self.usual_gap)
        )

    def expected(self, now: float) -> bool:
        """Is any writer of a recent write still to come back?"""
        return any(ended >= now - FORGET_AFTER for ended in self._out.values())

    def linger(self, usual_write: float) -> float:
        """How long a group about to begin its write waits for writers still expected
        back (seconds): 0 unless they usually come back well within a write's time."""
        if self.usual_gap is None:
            return 0.0
        wait = GAP_FACTOR * self.usual_gap
        return wait if wait <= LINGER_SHARE * usual_write else 0.0

    def wait_now(self, now: float, usual_write: float) -> float:
        """How long a group beginning its write at ``now`` waits: ``linger`` while any
        writer is still expected back, else 0 (it begins at once)."""
        return self.linger(usual_write) if self.expected(now) else 0.0
