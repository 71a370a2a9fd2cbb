"""Group commit: increments of one counter that queue up in a process share a write.

Every shard write costs a round trip and, on a busy client, more CPU than
anything else an increment does. A process writes one counter through one
write at a time: an increment that arrives while a write is in flight joins
the group waiting for the next, and that group goes out as one write of the
sum of its deltas. A group that waits longer than a slow write takes opens a
write slot of its own, up to ``max_concurrent_writes`` (slots.py says when).
A group takes members until its write begins, and when the members of the
write that just ended usually come straight back, it waits a moment for them
first (``slots.Returns``).
Every member still returns only once the write holding its delta committed
(or was stashed in delayed_incr), so nothing about what an ``increment``
call guarantees changes; under load there are simply fewer, larger writes.

A group's write either lands whole or not at all, so its outcome is every
member's outcome, with one exception: a ``CounterOverflowError`` or a bounded
counter's ``LimitReached`` (nothing was written) may be the sum's fault, so
each member then writes its own delta alone and gets its own answer. A bounded
counter groups increments of one sign only (``same_sign``): a sum within the
bounds then means each member, in some order, was too.

Keyed increments (``idempotency_key=``) group among themselves, never with
unkeyed ones: their write inserts one key record per key beside the shard
(store/keyed.py). A group holds each key once; a member whose key is already
in the group shares that member's outcome and adds nothing. The write reports
which keys it found applied already, or failed for, so each member gets its
own answer.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, Protocol, TypeVar

from ..errors import (
    CounterOverflowError,
    IncrementNotRecorded,
    IncrementOutcomeUnknown,
    LimitReached,
)
from .registry import PerCounter
from .slots import Returns, WriteTimes

T = TypeVar("T")

# The errors that name the delta they are about: each member gets its own.
_PER_DELTA = (IncrementNotRecorded, IncrementOutcomeUnknown)
# Refusals of a sum, with nothing written: each member then writes its own delta alone.
SUM_REFUSED = (CounterOverflowError, LimitReached)


class _Group:
    """Increments waiting for a write slot together. Its first member writes for all."""

    def __init__(self, keyed: bool, *, closed: bool = False) -> None:
        self.keyed = keyed
        self.closed = closed  # a member that writes alone: nobody else joins it
        self.deltas: list[int] = []
        self.writers: list[int] = []  # each member's thread, expected back when it ends
        self.total = 0
        self.keys: dict[str, int] = {}  # a keyed group's keys, each once, with its delta
        self.started = threading.Event()  # a slot was handed to this group (it still
        # takes members until its leader begins the write and takes it off the queue)
        self.done = threading.Event()  # the write finished; ``error`` says how
        self.error: BaseException | None = None
        self.result: Any = None  # what the write returned, for every member
        # A keyed write's failures per key (keys applied already are not in it).
        self.key_errors: Mapping[str, BaseException] = {}


#: A keyed group's write: ``{key: delta}`` in, ``{key: error}`` out for the keys that
#: failed (raising fails them all).
KeyedWrite = Callable[[dict[str, int]], Mapping[str, BaseException]]


class WriteCombiner:
    """The writes of one counter in this process (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified as writes finish
        self._running = 0  # writes in flight, and slots handed to groups about to write
        self._limit = 1
        self._paused = 0  # exclusive() holders: nothing starts while above 0
        self._queue: collections.deque[_Group] = collections.deque()
        self._times = WriteTimes()
        self._returns = Returns()
        self._joined = threading.Condition(self._lock)  # notified as writers join
        self._lingering = 0  # leaders waiting for returning writers

    def run(
        self,
        delta: int,
        write: Callable[[int], T],
        *,
        limit: int,
        max_total: int,
        same_sign: bool = False,
        eager: bool = False,
    ) -> T | None:
        """Have ``delta`` written by ``write`` (a function of an amount), alone or in a group,
        and return what that write returned (None when a group's deltas cancelled out and
        nothing was written).

        ``limit`` is how many writes may run at once; a group's total stays
        within ``±max_total`` (a delta larger than that goes in a group of its own).
        With ``same_sign`` a group holds deltas of one sign only. ``eager`` (the
        ``group_commit=False`` setting) starts a write at once whenever fewer than
        ``limit`` run, instead of only when none does.
        """
        group, leading = self._join(
            None,
            delta,
            limit=limit,
            max_total=max_total,
            max_keys=0,
            same_sign=same_sign,
            eager=eager,
        )
        if group is None:
            return self._timed(lambda: write(delta), threading.get_ident())
        if leading:
            # Deltas that cancel out need no write at all.
            self._write_for(group, lambda: write(group.total) if group.total else None)
        group.done.wait()
        error = group.error
        if error is None:
            return group.result  # type: ignore[no-any-return]
        if isinstance(error, SUM_REFUSED) and len(group.deltas) > 1:
            # Nothing was written: does this delta fit alone? Alone, but still within
            # ``limit``: on a pessimistic engine every member at once would queue on
            # each other's shard locks.
            return self._run_alone(delta, write, limit=limit, eager=eager)
        raise own_error(error, delta, len(group.deltas))

    def _run_alone(self, delta: int, write: Callable[[int], T], *, limit: int, eager: bool) -> T:
        group, _ = self._join(
            None, delta, limit=limit, max_total=0, max_keys=0, alone=True, eager=eager
        )
        if group is None:
            return self._timed(lambda: write(delta), threading.get_ident())
        self._write_for(group, lambda: write(delta))
        if group.error is not None:
            raise group.error
        return group.result  # type: ignore[no-any-return]

    def run_keyed(
        self,
        key: str,
        delta: int,
        write: KeyedWrite,
        *,
        limit: int,
        max_total: int,
        max_keys: int,
        eager: bool = False,
    ) -> None:
        """Have the keyed increment ``key`` of ``delta`` written by ``write``, alone or in a
        group of at most ``max_keys`` keys whose deltas sum within ``±max_total``."""
        group, leading = self._join(
            key, delta, limit=limit, max_total=max_total, max_keys=max_keys, eager=eager
        )
        if group is None:
            failed = self._timed(lambda: write({key: delta}), threading.get_ident())
            if key in failed:
                raise failed[key]
            return
        if leading:
            self._write_for(group, lambda: self._keyed_write(group, write))
        group.done.wait()
        error = group.error or group.key_errors.get(key)
        if error is None:
            return
        if isinstance(error, CounterOverflowError) and len(group.keys) > 1:
            failed = write({key: delta})  # nothing was written: does this one fit alone?
            if key in failed:
                raise failed[key]
            return
        raise own_error(error, group.keys[key], len(group.deltas))

    def _join(
        self,
        key: str | None,
        delta: int,
        *,
        limit: int,
        max_total: int,
        max_keys: int,
        same_sign: bool = False,
        alone: bool = False,
        eager: bool = False,
    ) -> tuple[_Group | None, bool]:
        """Take a write slot now (no group), or join the group queued for the next free
        one; and whether this member leads the group (it opened it, and writes for all).
        ``alone``: queue in a group of its own, which nobody joins. Only the first write
        starts at once: further slots open for groups that waited (``_await_slot``).
        A free slot is taken by a group, not at once, while writers are expected back
        (``slots.Returns``): it then waits for them before it writes."""
        me = threading.get_ident()
        with self._lock:
            self._limit = limit
            now = time.monotonic()
            self._returns.joined(me, now)
            if self._lingering:
                self._joined.notify_all()
            free = self._running < limit if eager else not self._running
            taken = False  # a free slot taken by a group that waits for returning writers
            if free and not self._queue and not self._paused:
                self._running += 1
                if alone or eager or not self._returns.wait_now(now, self._times.usual):
                    return None, False
                taken = True
            group, leading = queue_member(
                self._queue,
                _Group,
                key,
                delta,
                me,
                max_total=max_total,
                max_keys=max_keys,
                same_sign=same_sign,
                alone=alone,
            )
            if taken:
                group.started.set()  # the slot is its own: it only waits for the others
            return group, leading

    def _write_for(self, group: _Group, write: Callable[[], Any]) -> None:
        """Run the group's write once its slot comes; every member then sees the outcome."""
        self._await_slot(group)
        started = time.monotonic()
        try:
            group.result = write()
        except BaseException as exc:
            group.error = exc
        finally:
            self._release(time.monotonic() - started, group.writers, group.done)

    def _await_slot(self, group: _Group) -> None:
        """Wait until a slot is handed to ``group``, or open one when the writes ahead of
        it are slow (slots.py); wait a moment for writers expected back (slots.Returns);
        then close it to new members: its total is final."""
        while not group.started.wait(self._times.patience() if self._limit > 1 else None):
            with self._lock:
                if not group.started.is_set() and self._running < self._limit and not self._paused:
                    self._running += 1
                    group.started.set()
        with self._lock:
            now = time.monotonic()
            wait = 0.0 if group.closed else self._returns.wait_now(now, self._times.usual)
            if wait:
                deadline = now + wait
                self._lingering += 1
                try:
                    while now < deadline and self._returns.expected(now):
                        self._joined.wait(deadline - now)
                        now = time.monotonic()
                finally:
                    self._lingering -= 1
            self._queue.remove(group)  # from now on nobody joins it

    def _timed(self, write: Callable[[], T], writer: int) -> T:
        started = time.monotonic()
        try:
            return write()
        finally:
            self._release(time.monotonic() - started, [writer])

    @staticmethod
    def _keyed_write(group: _Group, write: KeyedWrite) -> None:
        group.key_errors = write(dict(group.keys))

    def _release(
        self, seconds: float, writers: list[int], done: threading.Event | None = None
    ) -> None:
        """A write of ``writers`` finished after ``seconds``: tell its members (``done``),
        expect them back, and hand its slot to the next group waiting for one, or free it."""
        with self._lock:
            self._times.took(seconds)
            # Expected before they can arrive, so that none is waited for once it is back.
            self._returns.finished(writers, time.monotonic())
            if done is not None:
                done.set()
            waiting = first_waiting(self._queue)
            if waiting is not None and not self._paused:
                waiting.started.set()
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
                if not self._paused:
                    self._running = hand_out(self._queue, self._running, self._limit)


G = TypeVar("G")


def queue_member(
    queue: collections.deque[G],
    make: Callable[..., G],
    key: str | None,
    delta: int,
    writer: Hashable,
    *,
    max_total: int,
    max_keys: int,
    same_sign: bool,
    alone: bool,
) -> tuple[G, bool]:
    """Put an increment of ``writer`` (a thread or a task) in the last group of ``queue``
    when it may join (``joinable``), else in a new one, ``make(keyed, closed=alone)``;
    return the group and whether this member leads it. A key already in the group is the
    same increment: it adds nothing, but its writer waits on the group all the same.
    Threads (this module) and tasks (aio/combiner.py) queue by these rules alike."""
    keyed = key is not None
    group: Any = queue[-1] if queue else None
    if key is not None and group is not None and key in group.keys:
        group.writers.append(writer)
        return group, False  # the same increment, waiting already: it adds nothing
    if (
        alone
        or group is None
        or not joinable(
            group, keyed, delta, max_total=max_total, max_keys=max_keys, same_sign=same_sign
        )
    ):
        group = make(keyed, closed=alone)
        queue.append(group)
    if key is not None:
        group.keys[key] = delta
    group.writers.append(writer)
    group.deltas.append(delta)
    group.total += delta
    return group, len(group.deltas) == 1


class _Flag(Protocol):
    def is_set(self) -> bool: ...
    def set(self) -> None: ...


class Slotted(Protocol):
    """A queued group, of threads or of tasks: ``started`` is set when a slot is
    handed to it (a ``threading.Event`` or an ``asyncio.Event``)."""

    @property
    def started(self) -> _Flag: ...


S = TypeVar("S", bound=Slotted)


def first_waiting(queue: collections.deque[S]) -> S | None:
    """The oldest group of ``queue`` no slot was handed to yet (groups handed one stay
    queued, taking members, until their leader begins the write)."""
    return next((g for g in queue if not g.started.is_set()), None)


def hand_out(queue: collections.deque[S], running: int, limit: int) -> int:
    """Hand free slots (below ``limit``) to the oldest waiting groups; the slots in use
    afterwards."""
    for group in queue:
        if running >= limit:
            break
        if not group.started.is_set():
            running += 1
            group.started.set()
    return running


def joinable(
    group: Any, keyed: bool, delta: int, *, max_total: int, max_keys: int, same_sign: bool
) -> bool:
    """May an increment of ``delta`` join ``group`` (the last one queued)? Not one that
    writes a member alone, not across keyed and unkeyed, not past ``±max_total`` or
    ``max_keys`` keys, and with ``same_sign`` not across signs."""
    return not (
        group.closed
        or group.keyed != keyed
        or abs(group.total + delta) > max_total
        or (same_sign and (group.deltas[0] > 0) != (delta > 0))
        or (keyed and len(group.keys) >= max_keys)
    )


def own_error(error: BaseException, delta: int, members: int) -> BaseException:
    """The error one member of a group of ``members`` sees: the group's, of the same class
    (a member of a write whose outcome is unknown is in doubt too), naming that member's
    own delta."""
    if not isinstance(error, _PER_DELTA) or members == 1:
        return error
    cause = error.__cause__ if error.__cause__ is not None else error
    own = type(error)(error.name, delta, cause)
    own.__cause__ = cause
    return own


_combiners: PerCounter[WriteCombiner] = PerCounter(WriteCombiner)


def combiner_for(*key: Hashable) -> WriteCombiner:
    """The process-wide combiner of one counter (its backend, settings and name)."""
    return _combiners.get(key)
