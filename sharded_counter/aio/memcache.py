"""The cache tier's way to memcache under asyncio: cache/guarded.py over ``emcache``.

The same calls with the same answers as ``GuardedClient`` (so the cache tier's
steps cannot tell the shells apart): ``gets`` gives ``(value, cas)`` or
``(None, None)``, ``add`` and ``cas`` say whether they stored, and every failure
is a ``CacheUnavailable`` whose ``maybe_applied`` says whether a write may have
landed; an outage is logged once when it starts and once when it ends.

Which server each call goes to is ``routing.py``'s: keys go to servers as the
blocking cluster client sends them (rendezvous hashing over ``host:port``
names), and several servers fail over as the blocking cluster does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import emcache

from ..cache.by_url import memcached_servers
from ..cache.client import OutageLog
from ..cache.memcached.ring import CasToken, token_is_current
from ..errors import CacheUnavailable
from ..settings import Settings
from .cache_guard import CacheGuard
from .routing import SERVER_FAILED, OneServer, ServerRing

T = TypeVar("T")

# The calls that change what memcached holds: one that fails after it was sent may
# have been applied.
_WRITES = frozenset({"add", "append", "cas", "set", "incr", "decr", "delete", "send"})
_NOT_STORED = (emcache.NotStoredStorageCommandError, emcache.StorageCommandError)

# memcached's refusals: answers, which the calls below read, not failures.
_ANSWERS = (*_NOT_STORED, emcache.NotFoundCommandError)


def _maybe_applied(method: str, exc: BaseException) -> bool:
    """A write may have landed unless memcached refused the connection."""
    return method in _WRITES and not isinstance(exc, ConnectionRefusedError)


def router_for(settings: Settings) -> OneServer | ServerRing | None:
    """How calls reach the memcached servers of ``settings``: None when there are none
    (a Redis or Valkey ``cache_url`` names none: aio/backend.py gives those
    ``AsyncRedisCache``)."""
    servers = memcached_servers(settings)
    if not servers:
        return None
    if len(servers) == 1:
        return OneServer(servers[0], settings)
    return ServerRing(servers, settings)


class AsyncMemcache:
    """Guarded memcache calls for the asyncio shell, on the servers of ``settings``.

    ``outage`` logs when memcache stops and starts answering (None for callers that
    log on their own, as the rate limiter does, saying what it means for its hits)."""

    def __init__(self, settings: Settings, *, outage: OutageLog | None) -> None:
        self.router = router_for(settings)
        self._guarding = CacheGuard(
            outage,
            answers=_ANSWERS,
            failures=(*SERVER_FAILED, emcache.CommandError, RuntimeError),
            maybe_applied=_maybe_applied,
        )

    @property
    def enabled(self) -> bool:
        return self.router is not None

    async def close(self) -> None:
        if self.router is not None:
            await self.router.close()

    async def _guarded(
        self, method: str, key: str, send: Callable[..., Awaitable[T]], *, heard: bool = True
    ) -> T:
        """``send(client, server, generation)`` on ``key``'s server, failures guarded."""
        return await self._guard(method, lambda router: router.call(method, key, send), heard=heard)

    async def _guard(
        self, method: str, call: Callable[[Any], Awaitable[T]], *, heard: bool = True
    ) -> T:
        router = self.router
        if router is None:
            raise CacheUnavailable("no memcached servers are configured (set MEMCACHED_HOSTS)")
        # A CacheUnavailable from the router: the key's server is out, nothing was sent.
        return await self._guarding(method, call(router), heard=heard)

    # -- what the cache tier's steps ask for (cache/guarded.py's calls) ---------------------

    async def gets(self, key: str) -> tuple[bytes | None, Any]:
        async def gets(c: emcache.Client, server: str, generation: int) -> tuple[bytes | None, Any]:
            item = await c.gets(key.encode())
            if item is None:
                return (None, None)
            return (item.value, CasToken(server, generation, item.cas))

        return await self._guarded("gets", key, gets)

    async def get(self, key: str) -> bytes | None:
        item = await self._guarded("get", key, lambda c, *_: c.get(key.encode()))
        return None if item is None else bytes(item.value)

    async def add(self, key: str, value: bytes, expire: int = 0, noreply: bool = False) -> bool:
        try:
            await self._guarded(
                "add",
                key,
                lambda c, *_: c.add(key.encode(), value, exptime=expire, noreply=noreply),
            )
        except _NOT_STORED:
            return False
        return True

    async def cas(
        self, key: str, value: bytes, cas: Any, expire: int = 0, noreply: bool = False
    ) -> bool:
        async def swap(c: emcache.Client, server: str, generation: int) -> bool:
            token = cas
            if isinstance(token, CasToken):
                if not token_is_current(token, server, generation):
                    return False  # read from another server, or an earlier life of this one
                token = token.value
            await c.cas(key.encode(), value, token, exptime=expire, noreply=noreply)
            return True

        try:
            return await self._guarded("cas", key, swap)
        except _NOT_STORED:
            return False  # changed since it was read (EXISTS), or gone (NOT_FOUND)

    async def append(self, key: str, value: bytes) -> bool:
        try:
            await self._guarded("append", key, lambda c, *_: c.append(key.encode(), value))
        except _NOT_STORED:
            return False
        return True

    async def delete(self, key: str) -> None:
        try:
            await self._guarded("delete", key, lambda c, *_: c.delete(key.encode()))
        except emcache.NotFoundCommandError:
            return  # gone already: what a delete wants

    async def send(self, method: str, key: str) -> None:
        """A ``noreply`` call (only ``delete``): its success is not taken for memcached
        answering, so it never ends an outage in the log."""
        if method != "delete":
            raise ValueError(f"no noreply {method} here")
        await self._guarded(
            "send", key, lambda c, *_: c.delete(key.encode(), noreply=True), heard=False
        )

    async def incr(self, key: str, value: int, noreply: bool = False) -> int | None:
        """The new value, or None when ``key`` is missing (as pymemcache answers)."""
        return await self._counter_call("incr", key, value, noreply)

    async def decr(self, key: str, value: int, noreply: bool = False) -> int | None:
        return await self._counter_call("decr", key, value, noreply)

    async def _counter_call(self, method: str, key: str, value: int, noreply: bool) -> int | None:
        def call(c: emcache.Client, *_: Any) -> Any:
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

    async def _many(self, method: str, keys: list[str], *, gets: bool) -> dict[str, Any]:
        def on_server(group: list[str]) -> Any:
            async def fetch(c: emcache.Client, server: str, generation: int) -> dict[str, Any]:
                encoded = [k.encode() for k in group]
                items = await (c.gets_many(encoded) if gets else c.get_many(encoded))
                return {
                    k.decode(): (item.value, CasToken(server, generation, item.cas))
                    for k, item in items.items()
                }

            return fetch

        return await self._guard(method, lambda router: router.call_groups(keys, on_server))
