"""The cache tier's way to Redis or Valkey under asyncio, over ``redis.asyncio``.

``AsyncMemcache``'s calls with its answers (``AsyncCache``), so the cache tier's
steps cannot tell the two apart: ``gets`` gives ``(value, cas)`` or ``(None,
None)``, ``add``, ``cas`` and ``append`` say whether they stored, and every failure
is a ``CacheUnavailable`` whose ``maybe_applied`` says whether a write may have
landed; an outage is logged once when it starts and once when it ends.

What each call sends and how its answer reads is ``cache/redis/commands.py``'s, the
very ``Call``s the blocking ``RedisClient`` sends, so both shells write the same
records (cas uniques from the server's clock, memcached's expiry and counters).
Scripts go by their SHA1, and whole only when the server answers NOSCRIPT (which
ran nothing). No call is sent twice: a write that timed out may have landed.

Each call borrows a connection from a pool (``redis_pool.py``: at most
``max_pool_size``, waiting up to ``memcache_timeout`` for one) and has
``memcache_timeout`` for its answer. A call that fails or is cancelled after it
was sent leaves its connection closed, never back in the pool with its answer
unread, so no other call can read that answer as its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..cache.by_url import tls_ca_file
from ..cache.client import OutageLog
from ..cache.redis import commands
from ..cache.redis.commands import CacheCommandError, CacheNotReached, Call, NoScript
from ..core.cache_url import CacheUrl
from ..errors import CacheUnavailable, ConfigurationError
from ..settings import Settings
from .cache_guard import CacheGuard
from .redis_pool import ConnectionPool, drop, within


def _refused_nothing_changed(method: str, exc: BaseException) -> bool:
    """A server's refusal (``CacheCommandError``) ran nothing: no write landed."""
    return False


def connection_maker(
    url: CacheUrl, settings: Settings, host: str, port: int
) -> Callable[[], redis.asyncio.Connection]:
    """How to open a connection to the server at ``host:port`` with ``url``'s
    username, password, db and TLS, and ``settings``' time limits (a cluster's nodes
    each get their own)."""
    connection_class: type[redis.asyncio.Connection] = (
        redis.asyncio.SSLConnection if url.tls else redis.asyncio.Connection
    )
    # A TLS connection checks the server's certificate and name: against
    # cache_ca_file when given, else the system's CAs.
    ca_file = tls_ca_file(settings) if url.tls else None
    tls_options: dict[str, Any] = {"ssl_ca_certs": ca_file} if ca_file else {}

    def connection() -> redis.asyncio.Connection:
        return connection_class(
            host=host,
            port=port,
            db=url.db,
            username=url.username,
            password=url.password,
            # No socket_timeout (redis-py 8's default is 5 s): each call has one
            # time limit of its own (exchange), and the pool limits the handshake.
            socket_timeout=None,
            socket_connect_timeout=settings.memcache_connect_timeout,
            # A call is sent once: resending a write that timed out could apply it twice.
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            **tls_options,
        )

    return connection


def pool_for(
    make: Callable[[], redis.asyncio.Connection], settings: Settings, max_pool_size: int
) -> ConnectionPool:
    """A pool of ``make``'s connections with ``settings``' time limits: a call waits
    up to ``memcache_timeout`` for one, a new one has both limits to be ready."""
    return ConnectionPool(
        make,
        size=max_pool_size,
        wait=settings.memcache_timeout,
        handshake=settings.memcache_connect_timeout + settings.memcache_timeout,
    )


class AsyncRedisCalls:
    """The calls of ``AsyncCache`` made of ``commands.Call``s, their failures guarded.

    A subclass says only how a call reaches a server (``_send``): ``AsyncRedisCache``
    over one pool, ``redis_cluster.AsyncRedisClusterCache`` to the node of its key's
    slot. ``outage`` logs when the cache stops and starts answering (None for callers
    that log on their own, as the rate limiter does)."""

    def __init__(self, *, outage: OutageLog | None) -> None:
        self._guard = CacheGuard(
            outage,
            answers=(),
            failures=(CacheCommandError,),
            maybe_applied=_refused_nothing_changed,
        )
        # incr and decr of data that is no number are refused with memcached's
        # CLIENT_ERROR: an answer their callers read (a rate limiter's garbled window),
        # as the blocking API and the memcached asyncio cache hand it on.
        self._counter_guard = CacheGuard(
            outage,
            answers=(CacheCommandError,),
            failures=(),
            maybe_applied=_refused_nothing_changed,
        )

    async def close(self) -> None:
        raise NotImplementedError

    @property
    def enabled(self) -> bool:
        return True

    # -- what the cache tier's steps ask for (cache/guarded.py's calls) ---------------------

    async def gets(self, key: str) -> tuple[bytes | None, Any]:
        found = await self._gets_many("gets", [key])
        return found.get(key, (None, None))

    async def get(self, key: str) -> bytes | None:
        found = await self._gets_many("get", [key])
        return found[key][0] if key in found else None

    async def add(self, key: str, value: bytes, expire: int = 0, noreply: bool = False) -> bool:
        return await self._perform("add", commands.add(key, value, expire, noreply)) is True

    async def cas(
        self, key: str, value: bytes, cas: Any, expire: int = 0, noreply: bool = False
    ) -> bool:
        """True when stored; False when another write came first or the key is gone."""
        return await self._perform("cas", commands.cas(key, value, cas, expire, noreply)) is True

    async def append(self, key: str, value: bytes) -> bool:
        return await self._perform("append", commands.append(key, value)) is True

    async def delete(self, key: str) -> None:
        await self._perform("delete", commands.delete(key))

    async def send(self, method: str, key: str) -> None:
        """A ``noreply`` call (only ``delete``), as ``AsyncMemcache.send``: its success is
        not taken for the server answering, so it never ends an outage in the log. (It
        still waits for the answer: Redis has no noreply.)"""
        if method != "delete":
            raise ValueError(f"no noreply {method} here")
        await self._perform("send", commands.delete(key, noreply=True), heard=False)

    async def incr(self, key: str, value: int, noreply: bool = False) -> int | None:
        """The new value, or None when ``key`` is missing (as pymemcache answers)."""
        call = commands.delta("incr", key, value, noreply)
        found = await self._counter_guard("incr", self._run(call))
        return None if found is None else int(found)

    async def decr(self, key: str, value: int, noreply: bool = False) -> int | None:
        call = commands.delta("decr", key, value, noreply)
        found = await self._counter_guard("decr", self._run(call))
        return None if found is None else int(found)

    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        found = await self._gets_many("get_many", keys)
        return {key: value for key, (value, _cas) in found.items()}

    async def gets_many(self, keys: list[str]) -> dict[str, tuple[bytes, Any]]:
        return await self._gets_many("gets_many", keys)

    async def _gets_many(self, method: str, keys: list[str]) -> dict[str, tuple[bytes, Any]]:
        _, call = commands.gets_many(keys)
        if call is None:
            return {}
        found: dict[str, tuple[bytes, Any]] = await self._perform(method, call)
        return found

    # -- talking to the server ------------------------------------------------------------

    async def _perform(self, method: str, call: Call, *, heard: bool = True) -> Any:
        """``call``'s answer, its failures guarded (``CacheGuard``) as ``method``'s."""
        return await self._guard(method, self._run(call), heard=heard)

    async def _run(self, call: Call) -> Any:
        """Send ``call`` and read its answer. A script goes by its SHA1, and whole when
        the server lacks it (after a restart or ``SCRIPT FLUSH``)."""
        if call.script is None:
            return call.read(await self._send(call, call.command))
        try:
            reply = await self._send(call, call.evalsha())
        except NoScript:
            reply = await self._send(call, call.eval())
        return call.read(reply)

    async def _send(self, call: Call, command: tuple[Any, ...]) -> Any:
        """Send ``command`` and return the server's answer; failures as
        ``commands.failure`` reads them, and ``CacheNotReached`` when it was never sent."""
        raise NotImplementedError


class AsyncRedisCache(AsyncRedisCalls):
    """Guarded cache calls for the asyncio shell, on the Redis or Valkey server ``url``
    names (its username, password, db and TLS), with the time limits of ``settings``.

    ``outage`` logs when the server stops and starts answering (None for callers that
    log on their own, as the rate limiter does)."""

    def __init__(
        self,
        url: CacheUrl,
        settings: Settings,
        *,
        outage: OutageLog | None,
        max_pool_size: int = 64,
    ) -> None:
        if url.cluster or len(url.hosts) != 1:
            raise ConfigurationError(
                f"AsyncRedisCache is one server, not {url.scheme}://: a cluster's URL "
                "takes redis_cluster.AsyncRedisClusterCache"
            )
        super().__init__(outage=outage)
        ((host, port),) = url.hosts
        self.address = (host, port)
        self._timeout = settings.memcache_timeout
        self._pool = pool_for(connection_maker(url, settings, host, port), settings, max_pool_size)

    def __repr__(self) -> str:
        host, port = self.address
        return f"AsyncRedisCache({host!r}, {port})"

    async def close(self) -> None:
        """Close every pooled connection; the next call opens a new one."""
        await self._pool.close()

    async def _send(self, call: Call, command: tuple[Any, ...]) -> Any:
        return await exchange(self._pool, call, command, timeout=self._timeout)


async def exchange(
    pool: ConnectionPool,
    call: Call,
    command: tuple[Any, ...],
    *,
    timeout: float,
    asking: bool = False,
    answers: tuple[type[BaseException], ...] = (),
) -> Any:
    """Send ``command`` on a connection of ``pool`` and return the server's answer
    (after ``ASKING``, when ``asking``: a cluster's ``ASK`` redirect), all within
    ``timeout``. Failures as ``commands.failure`` reads them; ``CacheNotReached``
    when no connection could be had (nothing was sent). An error of ``answers`` (a
    cluster's redirects) is raised as it is: an answer, read whole."""
    try:
        connection = await pool.borrow()
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        what = f"{type(exc).__name__}: {exc}".rstrip(": ")
        raise CacheNotReached(f"redis {call.name}: {what}", maybe_applied=False) from exc
    answered = False
    try:
        # One request on a connection that carries one call at a time: it fits
        # in the socket's buffer, so the time goes on waiting for the answer.
        async with within(timeout):
            if asking:
                await connection.send_command("ASKING")
                await connection.read_response()
            await connection.send_command(*command)
            try:
                reply = await connection.read_response()
            except answers:
                answered = True  # a refusal, read whole: the connection is clean
                raise
        answered = True
        return reply
    except BaseException as exc:  # a cancellation too: see drop
        if answered:
            raise
        if isinstance(exc, asyncio.TimeoutError):  # 3.10's is not the builtin one
            exc = RedisTimeoutError(f"no answer within {timeout} s")
        ours = commands.failure(exc, call)
        # A refusal (an error reply, NOSCRIPT) was read whole: the connection is
        # clean. Anything else may leave an answer on its way: close it.
        answered = ours is not None and not isinstance(ours, CacheUnavailable)
        if not answered:
            await drop(connection)
        if ours is None:
            raise
        raise ours from exc
    finally:
        pool.give_back(connection, reuse=answered)
