"""The cache tier's way to memcache under asyncio: cache/guarded.py over ``emcache``.

The same calls with the same answers as ``GuardedClient`` (so the cache tier's
steps cannot tell the shells apart): ``gets`` gives ``(value, cas)`` or
``(None, None)``, ``add`` and ``cas`` say whether they stored, and every failure
is a ``CacheUnavailable`` whose ``maybe_applied`` says whether a write may have
landed; an outage is logged once when it starts and once when it ends.

Keys go to servers as the blocking cluster client sends them, by rendezvous
hashing over ``host:port`` names, so a blocking and an asyncio process agree on
where each key lives. One ``emcache`` client per server. A server that fails
is not taken out of the ring here (the blocking ``ClusterClient`` does that):
its keys count as memcache being down, which the protocol is built to survive,
and for ``REST_AFTER_FAILURE`` seconds its calls fail at once, unsent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import emcache
from pymemcache.client.rendezvous import RendezvousHash

from ..cache.client import OutageLog
from ..errors import CacheUnavailable
from ..settings import Settings, parse_host

# The calls that change what memcached holds: one that fails after it was sent may
# have been applied.
_WRITES = frozenset({"add", "append", "cas", "set", "incr", "decr", "delete", "send"})
_NOT_STORED = (emcache.NotStoredStorageCommandError, emcache.StorageCommandError)
#: Seconds a server that failed a call is not asked again: calls for its keys fail at
#: once meanwhile (as memcache being down), instead of each waiting out the timeout.
REST_AFTER_FAILURE = 1.0

# memcached's refusals: answers, which the calls below read, not failures.
_ANSWERS = (*_NOT_STORED, emcache.NotFoundCommandError)


class AsyncMemcache:
    """Guarded memcache calls for the asyncio shell, on the servers of ``settings``.

    ``outage`` logs when memcache stops and starts answering (None for callers that
    log on their own, as the rate limiter does, saying what it means for its hits)."""

    def __init__(self, settings: Settings, *, outage: OutageLog | None) -> None:
        self._settings = settings
        servers = [parse_host(h) for h in settings.memcached_hosts]
        self._addresses = {f"{host}:{port}": (host, port) for host, port in servers}
        self._ring = RendezvousHash(nodes=list(self._addresses))
        self._clients: dict[str, emcache.Client] = {}
        self._opening: dict[str, asyncio.Future[emcache.Client]] = {}
        self._resting: dict[str, float] = {}  # server -> monotonic time its rest ends
        self._outage = outage

    @property
    def enabled(self) -> bool:
        return bool(self._addresses)

    async def _client_for(self, key: str) -> emcache.Client:
        name: str = self._ring.get_node(key)
        client = self._clients.get(name)
        if client is not None:
            return client
        opening = self._opening.get(name)
        if opening is None:
            host, port = self._addresses[name]
            s = self._settings
            opening = asyncio.ensure_future(
                emcache.create_client(
                    [emcache.MemcachedHostAddress(host, port)],
                    timeout=s.memcache_timeout,
                    connection_timeout=s.memcache_connect_timeout,
                    max_connections=64,
                    min_connections=1,
                )
            )
            self._opening[name] = opening
        try:
            client = await asyncio.shield(opening)
        finally:
            if opening.done():
                self._opening.pop(name, None)
        self._clients[name] = client
        return client

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    async def _guarded(self, method: str, key: str, call: Any, *, heard: bool = True) -> Any:
        if not self._addresses:
            raise CacheUnavailable("no memcached servers are configured (set MEMCACHED_HOSTS)")
        server: str = self._ring.get_node(key)
        if time.monotonic() < self._resting.get(server, 0.0):
            # emcache waits out its whole timeout on a server it cannot connect to (it
            # keeps reconnecting in the background): fail fast, unsent, for a while.
            raise CacheUnavailable(f"memcache {method} not sent: {server} failed just now")
        try:
            client = await self._client_for(key)
            result = await call(client)
        except _ANSWERS:
            if heard and self._outage is not None:
                self._outage.answered()
            raise
        except (OSError, asyncio.TimeoutError, emcache.CommandError, RuntimeError) as exc:
            # emcache's timeouts and refusals often say nothing in their text: name them.
            error = CacheUnavailable(
                f"memcache {method} failed: {type(exc).__name__}: {exc}".rstrip(": "),
                maybe_applied=method in _WRITES and not isinstance(exc, ConnectionRefusedError),
            )
            self._resting[server] = time.monotonic() + REST_AFTER_FAILURE
            if self._outage is not None:
                self._outage.failed(error, "reading totals from Datastore until it returns")
            raise error from exc
        if heard and self._outage is not None:
            self._outage.answered()
        return result

    # -- what the cache tier's steps ask for (cache/guarded.py's calls) ---------------------

    async def gets(self, key: str) -> tuple[bytes | None, Any]:
        item = await self._guarded("gets", key, lambda c: c.gets(key.encode()))
        return (None, None) if item is None else (item.value, item.cas)

    async def get(self, key: str) -> bytes | None:
        item = await self._guarded("get", key, lambda c: c.get(key.encode()))
        return None if item is None else bytes(item.value)

    async def add(self, key: str, value: bytes, expire: int = 0, noreply: bool = False) -> bool:
        try:
            await self._guarded(
                "add", key, lambda c: c.add(key.encode(), value, exptime=expire, noreply=noreply)
            )
        except _NOT_STORED:
            return False
        return True

    async def cas(
        self, key: str, value: bytes, cas: Any, expire: int = 0, noreply: bool = False
    ) -> bool:
        try:
            await self._guarded(
                "cas",
                key,
                lambda c: c.cas(key.encode(), value, cas, exptime=expire, noreply=noreply),
            )
        except _NOT_STORED:
            return False  # changed since it was read (EXISTS), or gone (NOT_FOUND)
        return True

    async def append(self, key: str, value: bytes) -> bool:
        try:
            await self._guarded("append", key, lambda c: c.append(key.encode(), value))
        except _NOT_STORED:
            return False
        return True

    async def delete(self, key: str) -> None:
        try:
            await self._guarded("delete", key, lambda c: c.delete(key.encode()))
        except emcache.NotFoundCommandError:
            return  # gone already: what a delete wants

    async def send(self, method: str, key: str) -> None:
        """A ``noreply`` call (only ``delete``): its success is not taken for memcached
        answering, so it never ends an outage in the log."""
        if method != "delete":
            raise ValueError(f"no noreply {method} here")
        await self._guarded(
            "send", key, lambda c: c.delete(key.encode(), noreply=True), heard=False
        )

    async def incr(self, key: str, value: int, noreply: bool = False) -> int | None:
        """The new value, or None when ``key`` is missing (as pymemcache answers)."""
        return await self._counter_call("incr", key, value, noreply)

    async def decr(self, key: str, value: int, noreply: bool = False) -> int | None:
        return await self._counter_call("decr", key, value, noreply)

    async def _counter_call(self, method: str, key: str, value: int, noreply: bool) -> int | None:
        def call(c: emcache.Client) -> Any:
            command = c.increment if method == "incr" else c.decrement
            return command(key.encode(), value, noreply=noreply)

        try:
            found = await self._guarded(method, key, call)
        except emcache.NotFoundCommandError:
            return None
        return None if found is None else int(found)

    async def get_many(self, keys: list[str]) -> dict[str, bytes]:
        found = await self._many("get_many", keys, gets=False)
        return {key: value for key, (value, _cas) in found.items()}

    async def gets_many(self, keys: list[str]) -> dict[str, tuple[bytes, Any]]:
        return await self._many("gets_many", keys, gets=True)

    async def _many(self, method: str, keys: Sequence[str], *, gets: bool) -> dict[str, Any]:
        by_server: dict[str, list[str]] = {}
        for key in keys:
            by_server.setdefault(self._ring.get_node(key), []).append(key)

        async def on_server(group: list[str]) -> dict[str, Any]:
            encoded = [k.encode() for k in group]

            async def fetch(c: emcache.Client) -> Any:
                return await (c.gets_many(encoded) if gets else c.get_many(encoded))

            items = await self._guarded(method, group[0], fetch)
            return {k.decode(): (item.value, item.cas) for k, item in items.items()}

        found: dict[str, Any] = {}
        for part in await asyncio.gather(*(on_server(g) for g in by_server.values())):
            found.update(part)
        return found
