"""``alock``: patterns/lock.py's locks for asyncio, on the same keys.

``async with alock('crazy', ttl=10): ...`` takes, extends and gives back the lock
through ``LeaseRules``' steps, the ones ``lock`` drives, so a blocking and an
asyncio process exclude each other. A wait for a held lock sleeps with
``asyncio.sleep``: other tasks run meanwhile.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from ..cache.client import ClientSource
from ..core.effects import Effect
from ..patterns.lock import LeaseRules
from .backend import async_memcache_for
from .shell import drive, on_memcache

__all__ = ["AsyncLease", "alock"]


class AsyncLease(LeaseRules):
    """One attempt to hold a named lock from asyncio code: ``async with``, or
    ``await acquire()`` / ``await release()``."""

    def __init__(
        self, name: str, *, ttl: int, nowait: bool, timeout: float | None, client: ClientSource
    ) -> None:
        super().__init__(
            name, ttl=ttl, nowait=nowait, timeout=timeout, key_prefix=client.key_prefix
        )
        self._settings = client.settings

    async def __aenter__(self) -> AsyncLease:
        return await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()

    async def acquire(self) -> AsyncLease:
        """Take the lock, waiting with backoff unless ``nowait``; raise ``Locked`` if it
        stays held, ``CacheUnavailable`` if memcache cannot be asked."""
        await drive(self._acquiring(), self._perform())
        return self

    async def extend(self, ttl: int | None = None) -> bool:
        """Push the expiry to ``ttl`` (default: the lease's) seconds from now, if still ours."""
        return await drive(self._extending(ttl), self._perform())

    async def release(self) -> bool:
        """Give the lock back if it is still ours. Never raises: a lock left behind lapses."""
        if self.expires_at is None:
            return False
        return await drive(self._releasing(), self._perform())

    def _perform(self) -> Callable[[Effect], Awaitable[Any]]:
        return on_memcache(async_memcache_for(self._settings))


def alock(
    name: str,
    ttl: int = 10,
    nowait: bool = True,
    timeout: float | None = None,
    *,
    memcached_hosts: str | list[str] | tuple[str, ...] | None = None,
    cache_url: str | None = None,
    key_prefix: str | None = None,
) -> AsyncLease:
    """``lock`` for asyncio: ``async with alock('crazy', ttl=10): ...``. The same
    arguments and errors (``Locked``, ``CacheUnavailable``), without ``memcache_client``
    (it makes its own asyncio connections to the cache ``cache_url`` or
    ``memcached_hosts`` names, else the settings')."""
    if not isinstance(name, str):
        raise TypeError(f"a lock name is a str, not {type(name).__name__}")
    source = ClientSource(
        None,
        memcached_hosts=memcached_hosts,
        cache_url=cache_url,
        key_prefix=key_prefix,
        what="alock",
    )
    return AsyncLease(name, ttl=ttl, nowait=nowait, timeout=timeout, client=source)
