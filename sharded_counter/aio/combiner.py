"""Group commit among tasks: paths/combiner.py for asyncio.

The same rules as among threads: one write of a counter in flight in an event
loop, and more, up to ``max_concurrent_writes``, only for groups that waited
longer than a slow write takes (paths/slots.py); an increment that arrives
while a write is in flight joins the group waiting for the next
(``combiner.queue_member`` decides, as it does for threads), and the group goes out
as one write of its sum; a group about to write waits a moment for the members
of the write that just ended when they usually come straight back
(``slots.Returns``). Every member returns once that write is over, with
its outcome (``combiner.own_error`` names each member's own delta in an error).
A sum refused whole (``CounterOverflowError``) is written again member by member.
Keyed increments group among themselves, each key once, and each member gets
its own key's answer, as among threads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from ..errors import CounterOverflowError
from ..paths.combiner import SUM_REFUSED, first_waiting, hand_out, own_error, queue_member
from ..paths.slots import Returns, WriteTimes

T = TypeVar("T")


class _Group:
    """Increments waiting for a write slot together; its first member writes for all."""

    def __init__(self, keyed: bool, *, closed: bool = False) -> None:
        self.keyed = keyed
        self.closed = closed
        self.deltas: list[int] = []
        self.writers: list[int] = []  # each member's task, expected back when it ends
        self.total = 0
        self.keys: dict[str, int] = {}
        self.started = asyncio.Event()
        self.done = asyncio.Event()
        self.error: BaseException | None = None
        self.result: Any = None
        # A keyed write's failures per key (keys applied already are not in it).
        self.key_errors: Mapping[str, BaseException] = {}


#: A keyed group's write: ``{key: delta}`` in, ``{key: error}`` out for the keys that
#: failed (raising fails them all).
AsyncKeyedWrite = Callable[[dict[str, int]], Awaitable[Mapping[str, BaseException]]]


class AsyncWriteCombiner:
    """The writes of one counter in one event loop."""

    def __init__(self) -> None:
        self._running = 0
        self._limit = 1
        self._paused = 0
        self._idle = asyncio.Event()
        self._queue: collections.deque[_Group] = collections.deque()
        self._times = WriteTimes()
        self._returns = Returns()
        self._joined = asyncio.Event()  # set as writers join, for a group waiting on them

    async def run(
        self,
        delta: int,
        write: Callable[[int], Awaitable[T]],
        *,
        limit: int,
        max_total: int,
        eager: bool = False,
    ) -> T | None:
        """Have ``delta`` written by ``write``, alone or in a group; what that write
        returned (None when a group's deltas cancelled out and nothing was written).
        ``eager`` as for threads (paths/combiner.py)."""
        group, leading = self._join(delta, limit=limit, max_total=max_total, eager=eager)
        if group is None:
            return await self._timed(write(delta), _me())
        if leading:
            # The total once the slot comes: members join until then.
            await self._write_for(group, lambda: write(group.total) if group.total else _nothing())
        await group.done.wait()
        error = group.error
        if error is None:
            return group.result  # type: ignore[no-any-return]
        if isinstance(error, SUM_REFUSED) and len(group.deltas) > 1:
            return await self._run_alone(delta, write, eager)
        raise own_error(error, delta, len(group.deltas))

    async def _run_alone(self, delta: int, write: Callable[[int], Awaitable[T]], eager: bool) -> T:
        group, _ = self._join(delta, limit=self._limit, max_total=0, alone=True, eager=eager)
        if group is None:
            return await self._timed(write(delta), _me())
        await self._write_for(group, lambda: write(delta))
        if group.error is not None:
            raise group.error
        return group.result  # type: ignore[no-any-return]

    async def run_keyed(
        self,
        key: str,
        delta: int,
        write: AsyncKeyedWrite,
        *,
        limit: int,
        max_total: int,
        max_keys: int,
        eager: bool = False,
    ) -> None:
        """Have the keyed increment ``key`` of ``delta`` written by ``write``, alone or in a
        group of at most ``max_keys`` keys whose deltas sum within ``±max_total``."""
        group, leading = self._join(
            delta, limit=limit, max_total=max_total, key=key, max_keys=max_keys, eager=eager
        )
        if group is None:
            failed = await self._timed(write({key: delta}), _me())
            if key in failed:
                raise failed[key]
            return
        if leading:
            await self._write_for(group, lambda: self._keyed_write(group, write))
        await group.done.wait()
        error = group.error or group.key_errors.get(key)
        if error is None:
            return
        if isinstance(error, CounterOverflowError) and len(group.keys) > 1:
            failed = await write({key: delta})  # nothing was written: does this one fit alone?
            if key in failed:
                raise failed[key]
            return
        raise own_error(error, group.keys[key], len(group.deltas))

    @staticmethod
    async def _keyed_write(group: _Group, write: AsyncKeyedWrite) -> None:
        group.key_errors = await write(dict(group.keys))

    def _join(
        self,
        delta: int,
        *,
        limit: int,
        max_total: int,
        alone: bool = False,
        key: str | None = None,
        max_keys: int = 0,
        eager: bool = False,
    ) -> tuple[_Group | None, bool]:
        self._limit = limit
        me, now = _me(), time.monotonic()
        self._returns.joined(me, now)
        self._joined.set()
        free = self._running < limit if eager else not self._running
        taken = False  # a free slot taken by a group that waits for returning tasks
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
            same_sign=False,
            alone=alone,
        )
        if taken:
            group.started.set()  # the slot is its own: it only waits for the others
        return group, leading

    async def _write_for(self, group: _Group, write: Callable[[], Awaitable[Any]]) -> None:
        await self._await_slot(group)
        started = time.monotonic()
        try:
            group.result = await write()
        except BaseException as exc:
            group.error = exc
        finally:
            self._release(time.monotonic() - started, group.writers, group.done)

    async def _await_slot(self, group: _Group) -> None:
        """Wait until a slot is handed to ``group``, or open one when the writes ahead of
        it are slow (paths/slots.py), then close it to new members: its total is final."""
        while not group.started.is_set():
            if self._limit == 1:
                await group.started.wait()
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(group.started.wait(), self._times.patience())
            if not group.started.is_set() and self._running < self._limit and not self._paused:
                self._running += 1
                group.started.set()
        now = time.monotonic()
        wait = 0.0 if group.closed else self._returns.wait_now(now, self._times.usual)
        if wait:
            deadline = now + wait
            while now < deadline and self._returns.expected(now):
                self._joined.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._joined.wait(), deadline - now)
                now = time.monotonic()
        self._queue.remove(group)  # from now on nobody joins it

    async def _timed(self, write: Awaitable[T], writer: int) -> T:
        started = time.monotonic()
        try:
            return await write
        finally:
            self._release(time.monotonic() - started, [writer])

    def _release(
        self, seconds: float, writers: list[int], done: asyncio.Event | None = None
    ) -> None:
        """A write of ``writers`` finished after ``seconds``: tell its members (``done``),
        expect them back, and hand its slot to the next group waiting for one, or free it."""
        self._times.took(seconds)
        self._returns.finished(writers, time.monotonic())
        if done is not None:
            done.set()
        waiting = first_waiting(self._queue)
        if waiting is not None and not self._paused:
            waiting.started.set()
        else:
            self._running -= 1
            if not self._running:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold every write of this counter in this loop: wait for those running, and
        queue new ones (they go out, grouped, on leaving)."""
        self._paused += 1
        try:
            while self._running:
                self._idle.clear()
                await self._idle.wait()
            yield
        finally:
            self._paused -= 1
            if not self._paused:
                self._running = hand_out(self._queue, self._running, self._limit)


async def _nothing() -> None:
    return None


def _me() -> int:
    """The writer: the task calling (the loop itself outside one, for a callback), by
    its id, so that a task that never comes back is not kept alive by the wait."""
    return id(asyncio.current_task() or asyncio.get_running_loop())
