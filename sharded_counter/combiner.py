"""Group commit: increments of one counter that queue up in a process share a write.

Every shard write costs a round trip and, on a busy client, more CPU than
anything else an increment does. A process lets at most
``max_concurrent_writes`` writes of one counter run at once; an increment
that arrives while that many are in flight joins the group waiting for the
next free slot, and that group goes out as one write of the sum of its
deltas. Every member still returns only once the write holding its delta
committed (or was stashed in delayed_incr), so nothing about what an
``increment`` call guarantees changes; under load there are simply fewer,
larger writes.

A group's write either lands whole or not at all, so its outcome is every
member's outcome, with one exception: a ``CounterOverflowError`` (nothing
was written) may be the sum's fault, so each member then writes its own delta
alone and gets its own answer.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from .errors import CounterOverflowError, IncrementNotRecorded
from .registry import PerCounter


class _Group:
    """Increments waiting for a write slot together. Its first member writes for all."""

    def __init__(self) -> None:
        self.deltas: list[int] = []
        self.total = 0
        self.started = threading.Event()  # a slot was handed to this group
        self.done = threading.Event()  # the write finished; ``error`` says how
        self.error: BaseException | None = None


class WriteCombiner:
    """The writes of one counter in this process (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified as writes finish
        self._running = 0
        self._limit = 1
        self._paused = 0  # exclusive() holders: nothing starts while above 0
        self._queue: collections.deque[_Group] = collections.deque()

    def run(self, delta: int, write: Callable[[int], Any], *, limit: int, max_total: int) -> None:
        """Have ``delta`` written by ``write`` (a function of an amount), alone or in a group.

        ``limit`` is how many writes may run at once; a group's total stays
        within ``±max_total`` (a delta larger than that goes in a group of its own).
        """
        with self._lock:
            self._limit = limit
            if self._running < limit and not self._queue and not self._paused:
                self._running += 1
                group = None
            else:
                group = self._queue[-1] if self._queue else None
                if group is None or abs(group.total + delta) > max_total:
                    group = _Group()
                    self._queue.append(group)
                group.deltas.append(delta)
                group.total += delta
                leading = len(group.deltas) == 1
        if group is None:
            try:
                write(delta)
            finally:
                self._release()
            return
        if leading:
            group.started.wait()
            try:
                # Deltas that cancel out need no write at all.
                if group.total:
                    write(group.total)
            except BaseException as exc:
                group.error = exc
            finally:
                group.done.set()
                self._release()
        else:
            group.done.wait()
        error = group.error
        if error is None:
            return
        if isinstance(error, CounterOverflowError) and len(group.deltas) > 1:
            write(delta)  # nothing was written: find out whether this delta fits alone
            return
        own = self._own_error(error, delta, group)
        if own is error:
            raise error
        raise own from error.__cause__

    @staticmethod
    def _own_error(error: BaseException, delta: int, group: _Group) -> BaseException:
        """The error one member sees: ``IncrementNotRecorded`` names that member's own delta."""
        if not isinstance(error, IncrementNotRecorded) or len(group.deltas) == 1:
            return error
        cause = error.__cause__ if error.__cause__ is not None else error
        return IncrementNotRecorded(error.name, delta, cause)

    def _release(self) -> None:
        """A write finished: hand its slot to the next group, or free it."""
        with self._lock:
            if self._queue and not self._paused:
                self._queue.popleft().started.set()  # no one joins it from now on
            else:
                self._running -= 1
                self._idle.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold every write of this counter in this process: wait for those running,
        and queue new ones (they go out, grouped, on leaving)."""
        with self._lock:
            self._paused += 1
            while self._running:
                self._idle.wait()
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                while not self._paused and self._queue and self._running < self._limit:
                    self._running += 1
                    self._queue.popleft().started.set()


_combiners: PerCounter[WriteCombiner] = PerCounter(WriteCombiner)


def combiner_for(*key: Hashable) -> WriteCombiner:
    """The process-wide combiner of one counter (its backend, settings and name)."""
    return _combiners.get(key)
