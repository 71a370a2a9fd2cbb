"""The cache tier's way to a Redis or Valkey cluster under asyncio.

``AsyncRedisCache``'s calls and answers (the same ``commands.Call``s), each sent to
the primary that holds its key's hash slot, routed by the rules the blocking
``cache/redis/cluster.py`` follows (``cache/redis/slots.py``): a multi-key read is
one ``MGET`` per slot; a ``MOVED`` or ``ASK`` answer (nothing ran) is followed up to
``MAX_REDIRECTS`` times; ``CLUSTERDOWN``, ``TRYAGAIN`` and redirects that do not
settle are ``ClusterRefused``; a call that found no connection (nothing sent) goes
to the slot's new primary if a fresh reading of the map names one.

Why not ``redis.asyncio.cluster.RedisCluster`` (redis-py 8.2 read): its
``execute_command`` sends a call again after a timeout or a lost connection (its
``retry``: by default 10 retries; ``cluster_error_retry_attempts`` is the deprecated
knob for it). That can be set to 0, but the redirect loop (up to 16 redirects),
the pools and the connections it sends on would still be redis-py's, so proving
that no call goes out twice would mean following its control flow through each
release. Here ``redis_cache.exchange`` does every sending, on a connection of this
module's per-node pools (``redis_pool.py``'s kind, one per primary: a call that
fails or is cancelled after it was sent closes its connection), and ``_send`` calls
it again only after an answer that says nothing ran (a redirect; NOSCRIPT, in
``_run``) or when no connection could be had. The map is this module's own, read
with ``CLUSTER SLOTS`` (``slots.SlotMap``) from any node that answers.

A call sent and then unanswered (a timeout, a lost connection) is never sent
again: ``CacheUnavailable`` with ``maybe_applied`` for a write, and the map is read
again before the next call. A node that starts serving slots it did not serve
before (a promoted replica, seen on a reading of the map or in a ``MOVED``) has
every counter record deleted before any call of this client reaches it, as the
blocking client does: its copy may miss its old primary's last writes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio
from redis.exceptions import ClusterDownError, RedisError

from ..cache.client import OutageLog
from ..cache.redis import commands, slots
from ..cache.redis.commands import CacheConnectionLost, CacheNotReached, CacheTimedOut, Call
from ..cache.redis.slots import MAX_REDIRECTS, Address, ClusterRefused, SlotMap
from ..core.cache_url import CacheUrl
from ..errors import ConfigurationError
from ..settings import Settings
from .redis_cache import AsyncRedisCalls, connection_maker, exchange, pool_for
from .redis_pool import ConnectionPool, drop, within

__all__ = ["AsyncRedisClusterCache", "ClusterRefused"]

# What asking a node for the map, or cleaning a promoted one, fails with.
_NODE_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


class AsyncRedisClusterCache(AsyncRedisCalls):
    """Guarded cache calls for the asyncio shell, on the Redis or Valkey cluster
    ``url`` names (its nodes are the seeds; its username, password and TLS), with the
    time limits of ``settings``. Nothing connects until the first call.

    ``outage`` logs when the cluster stops and starts answering (None for callers
    that log on their own, as the rate limiter does)."""

    def __init__(
        self,
        url: CacheUrl,
        settings: Settings,
        *,
        outage: OutageLog | None,
        max_pool_size: int = 64,
    ) -> None:
        if not url.cluster:
            raise ConfigurationError(
                f"AsyncRedisClusterCache is a cluster's, not {url.scheme}://'s: "
                "one server takes redis_cache.AsyncRedisCache"
            )
        super().__init__(outage=outage)
        self.seeds: list[Address] = list(url.hosts)
        self._url = url
        self._settings = settings
        self._timeout = settings.memcache_timeout
        self._max_pool_size = max_pool_size
        self._pools: dict[Address, ConnectionPool] = {}
        self._map: SlotMap | None = None
        self._stale = False  # a failure asked for the map to be read again
        self._refreshed_at = float("-inf")
        # Promoted primaries whose counter records are still to be deleted.
        self._unclean: set[Address] = set()
        self._lock = asyncio.Lock()  # one reading of the map, one clean-up, at a time

    def __repr__(self) -> str:
        seeds = ",".join(f"{host}:{port}" for host, port in self.seeds)
        return f"AsyncRedisClusterCache({seeds!r})"

    async def close(self) -> None:
        """Close every connection; the next call reads the map and connects again."""
        pools, self._pools = list(self._pools.values()), {}
        self._map = None
        for pool in pools:
            await pool.close()

    # -- reads across slots -------------------------------------------------------------

    async def _gets_many(self, method: str, keys: list[str]) -> dict[str, tuple[bytes, Any]]:
        """One ``MGET`` per hash slot of ``keys``, the answers merged."""
        found: dict[str, tuple[bytes, Any]] = {}
        for group in slots.by_slot(keys).values():
            _, call = commands.gets_many(group)
            assert call is not None  # a group has a key
            found.update(await self._perform(method, call))
        return found

    # -- talking to the cluster -----------------------------------------------------------

    async def _send(self, call: Call, command: tuple[Any, ...]) -> Any:
        """Send ``command`` to the primary of its key's slot, following redirects."""
        slot = slots.slot_of(call.key if call.script is not None else command[1])
        await self._topology(call)
        asked: Address | None = None  # where an ASK redirect sent the call
        for _ in range(1 + MAX_REDIRECTS):
            address = asked or self._primary(slot, call)
            if address in self._unclean:
                await self._topology(call)  # cleans it first, or raises
            try:
                return await exchange(
                    self._pool(address),
                    call,
                    command,
                    timeout=self._timeout,
                    asking=asked is not None,
                    answers=slots.RAN_NOTHING,
                )
            except slots.RAN_NOTHING as answer:
                asked = self._follow(call, answer)
            except (CacheTimedOut, CacheConnectionLost):
                self._stale = True  # the node may be down: look again before the next call
                raise
            except CacheNotReached:
                # Never sent. The node may be gone for good (a primary that failed
                # over): read the map again, and go on only if the slot moved.
                await self._topology(call, refresh=True)
                if asked is None and self._primary(slot, call) == address:
                    raise
                asked = None
        raise ClusterRefused(
            f"redis {call.name}: slot {slot} still redirected after {MAX_REDIRECTS} redirects",
            maybe_applied=False,
        )

    def _follow(self, call: Call, answer: Exception) -> Address | None:
        """Where a call goes after ``answer`` (which ran nothing): the address an
        ``ASK`` names, or None (the slot's primary) after a ``MOVED``, which moves
        the slot in the map. ``TRYAGAIN`` and ``CLUSTERDOWN`` are ``ClusterRefused``."""
        redirect = slots.redirect(answer)
        if redirect is None:
            if isinstance(answer, ClusterDownError):
                self._stale = True
            raise ClusterRefused(f"redis {call.name}: {answer}", maybe_applied=False) from answer
        if not redirect.moved:
            return redirect.address
        current = self._current_map()
        before = current.serving()
        current.move(redirect.slot, redirect.address)
        self._unclean |= slots.newly_serving(before, current.serving())
        return None

    def _primary(self, slot: int, call: Call) -> Address:
        address = self._current_map().primary(slot)
        if address is None:
            self._stale = True
            raise ClusterRefused(
                f"redis {call.name}: no node serves slot {slot}", maybe_applied=False
            )
        return address

    def _current_map(self) -> SlotMap:
        assert self._map is not None, "the map is read before a call is routed"
        return self._map

    def _pool(self, address: Address) -> ConnectionPool:
        pool = self._pools.get(address)
        if pool is None:
            host, port = address
            make = connection_maker(self._url, self._settings, host, port)
            pool = self._pools[address] = pool_for(make, self._settings, self._max_pool_size)
        return pool

    # -- the map, and promoted primaries ----------------------------------------------------

    async def _topology(self, call: Call, *, refresh: bool = False) -> None:
        """Read the map on first use and again when a failure asked for it (at most
        every ``MIN_REFRESH_INTERVAL`` seconds); clean every promoted primary."""
        if self._map is not None and not (refresh or self._stale or self._unclean):
            return  # the common case: no lock taken
        async with self._lock:
            stale = refresh or self._stale
            if self._map is None or (stale and not self._refresh_too_soon()):
                try:
                    await self._read_map(call)
                finally:
                    self._refreshed_at = time.monotonic()
            await self._clean(call)

    def _refresh_too_soon(self) -> bool:
        return time.monotonic() - self._refreshed_at < slots.MIN_REFRESH_INTERVAL

    async def _read_map(self, call: Call) -> None:
        """Ask the known primaries, then the seeds, for ``CLUSTER SLOTS``; the first
        answer is the map. A node serving slots it did not serve before is unclean."""
        known = sorted(self._map.serving()) if self._map is not None else []
        failures: list[str] = []
        for address in dict.fromkeys([*known, *self.seeds]):
            try:
                answer = await self._ask(address, ("CLUSTER", "SLOTS"))
            except _NODE_FAILURES as exc:
                failures.append(f"{address[0]}:{address[1]}: {type(exc).__name__}: {exc}")
                continue
            fresh = SlotMap.read(answer, address)
            if self._map is not None:
                self._unclean |= slots.newly_serving(self._map.serving(), fresh.serving())
            self._map = fresh
            self._stale = False
            return
        raise CacheNotReached(
            f"redis {call.name}: no node of the cluster answered: {'; '.join(failures)}",
            maybe_applied=False,
        )

    async def _ask(self, address: Address, command: tuple[Any, ...]) -> Any:
        """``command``'s answer from ``address``, on a connection of its own, closed
        after it (a node that may be down gets no pool of ours for it)."""
        host, port = address
        connection: redis.asyncio.Connection = connection_maker(
            self._url, self._settings, host, port
        )()
        try:
            async with within(self._settings.memcache_connect_timeout + self._timeout):
                await connection.connect()  # type: ignore[no-untyped-call]
                await connection.send_command(*command)
                return await connection.read_response()
        finally:
            await drop(connection)

    async def _clean(self, call: Call) -> None:
        """Delete the counter records on every promoted primary not cleaned yet (the
        lock held). A node that fails the clean-up stays to be cleaned, and this call
        is ``ClusterRefused``."""
        serving = self._current_map().serving()
        for address in sorted(self._unclean):
            if address not in serving:  # no slot of its: no call will reach it
                self._unclean.discard(address)
                continue
            try:
                await self._delete_records(self._pool(address))
            except _NODE_FAILURES as exc:
                self._stale = True
                raise ClusterRefused(
                    f"redis {call.name}: {address[0]}:{address[1]} was promoted and its "
                    f"counter records could not be deleted yet: {type(exc).__name__}: {exc}",
                    maybe_applied=False,
                ) from exc
            self._unclean.discard(address)

    async def _delete_records(self, pool: ConnectionPool) -> int:
        """Delete every counter record on ``pool``'s node (one ``SCAN`` pass, each
        step and its ``UNLINK``s within ``memcache_timeout``); returns how many."""
        connection = await pool.borrow()
        clean = False
        deleted = 0
        try:
            cursor: Any = b"0"
            while True:
                async with within(self._timeout):
                    await connection.send_command(
                        "SCAN", cursor, "MATCH", slots.RECORD_MATCH, "COUNT", slots.SCAN_COUNT
                    )
                    cursor, keys = await connection.read_response()
                    deleted += await _unlink(connection, [k for k in keys if slots.is_record(k)])
                if int(cursor) == 0:
                    break
            clean = True
            return deleted
        finally:
            if not clean:
                await drop(connection)
            pool.give_back(connection, reuse=clean)


async def _unlink(connection: redis.asyncio.Connection, keys: list[bytes]) -> int:
    """``UNLINK`` each of ``keys`` (one command per key: they may be in different
    slots), sent together; returns how many were there."""
    if not keys:
        return 0
    await connection.send_packed_command(connection.pack_commands([("UNLINK", k) for k in keys]))
    return sum([int(await connection.read_response()) for _ in keys])
