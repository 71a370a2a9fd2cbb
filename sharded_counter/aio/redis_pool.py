"""The connections ``AsyncRedisCache`` lends its calls: a pool, and a time limit per call.

redis-py's ``BlockingConnectionPool`` lends a connection through a condition, a
lock and metrics, and with ``socket_timeout`` set it runs every send as a task of
its own (``asyncio.wait_for``): in a test of 64 tasks that cost about twice the
CPU per call of the memcached client, all of it on the event loop. Here a
semaphore and a list lend the connections, and one timer limits each call.

A connection is lent to one call at a time and goes back only when its answer was
read whole; one that failed, timed out or was cancelled mid-call is closed, so
no other call reads its answer (``drop``).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import redis.asyncio
from redis.exceptions import RedisError

if sys.version_info >= (3, 11):
    from asyncio import timeout as within
else:  # redis-py brings async-timeout on Python 3.10
    from async_timeout import timeout as within  # type: ignore[import-not-found, unused-ignore]

__all__ = ["ConnectionPool", "drop", "within"]


class ConnectionPool:
    """At most ``size`` connections that ``make`` makes, to one server: a call waits
    up to ``wait`` seconds for one, and a new one has ``handshake`` seconds to
    connect and be ready (TLS, AUTH, SELECT)."""

    def __init__(
        self,
        make: Callable[[], redis.asyncio.Connection],
        *,
        size: int,
        wait: float,
        handshake: float,
    ) -> None:
        self._make = make
        self._wait = wait
        self._handshake = handshake
        self._room = asyncio.Semaphore(size)
        self._idle: list[redis.asyncio.Connection] = []
        self._lent: set[redis.asyncio.Connection] = set()

    @property
    def idle(self) -> int:
        """How many open connections wait for a call."""
        return len(self._idle)

    async def borrow(self) -> redis.asyncio.Connection:
        """A connection ready for one call, the caller's until ``give_back``.

        Raises ``TimeoutError`` (``asyncio.TimeoutError`` on 3.10) when none is free
        in time or a new one does not connect in time; ``RedisError`` or ``OSError``
        when it cannot connect. Nothing was sent then."""
        if self._room.locked():
            async with within(self._wait):
                await self._room.acquire()
        else:
            await self._room.acquire()  # free: taken without yielding
        connection = self._idle.pop() if self._idle else self._make()
        try:
            if connection.is_connected and await _left_unclean(connection):
                await drop(connection)
            if not connection.is_connected:
                async with within(self._handshake):
                    await connection.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await drop(connection)
            self._room.release()
            raise
        self._lent.add(connection)
        return connection

    def give_back(self, connection: redis.asyncio.Connection, *, reuse: bool) -> None:
        """End ``connection``'s loan: kept for the next call when ``reuse`` (its answer
        was read whole and it is open), else left to be closed."""
        self._lent.discard(connection)
        if reuse and connection.is_connected:
            self._idle.append(connection)
        self._room.release()

    async def close(self) -> None:
        """Close every connection, idle or lent (a call on a lent one then fails)."""
        everyone = [*self._idle, *self._lent]
        self._idle.clear()
        for connection in everyone:
            await drop(connection)


async def _left_unclean(connection: redis.asyncio.Connection) -> bool:
    """Whether an idle connection is unfit for a call: the server closed it while it
    waited (a restart, its idle timeout), or it holds bytes no call asked for. Then
    it is opened afresh rather than made to fail a call (redis-py's pools check the
    same)."""
    try:
        can_read = getattr(connection, "can_read", None)  # redis-py 8; before, below
        if can_read is None:
            can_read = connection.can_read_destructive
        return bool(await can_read())
    except (RedisError, OSError):
        return True


async def drop(connection: redis.asyncio.Connection) -> None:
    """Close ``connection``: its answer may still come (a timeout), or a cancellation
    mid-read left it unread, and a call that read on would take that answer for its
    own. The pool opens a new connection in its place.

    ``nowait``: the socket is closed before the first await, so a second
    cancellation cannot leave it open."""
    await connection.disconnect(nowait=True)
