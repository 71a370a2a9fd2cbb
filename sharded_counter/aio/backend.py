"""What an ``AsyncCounter`` talks to, per event loop.

The protocol's objects are the blocking ``Backend``'s (paths/backend.py): the
store and cache tier whose methods are steps, the shard pickers, the
sightings of each stash. They hold no sockets of their own that the steps
use, so both shells share them, and a process that counts from threads and
tasks at once keeps one picture of each counter. What differs is the I/O: a
``grpc.aio`` channel and the cache's asyncio clients belong to one event loop, so each
loop gets its own ``AsyncShell``, and its own group commit per counter.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Hashable
from typing import Any

from ..cache.by_url import cache_url_of
from ..cache.client import OutageLog, cache_client_key
from ..errors import ConfigurationError
from ..memory.backends import AsyncMemoryCache, memory_cache
from ..paths.backend import Backend
from ..paths.registry import PerCounter
from ..process import forget_at_fork
from ..settings import Settings
from .cache_guard import AsyncCache
from .combiner import AsyncWriteCombiner
from .memcache import AsyncMemcache
from .rpc import async_rpc_for
from .shell import AsyncShell


class AsyncBackend:
    """The asyncio shell over one ``Backend``, in the running event loop."""

    def __init__(self, backend: Backend, settings: Settings) -> None:
        self.backend = backend
        self.shell = AsyncShell(
            async_rpc_for(backend.store.client, timeout=settings.rpc_timeout),
            async_cache(
                settings, outage=OutageLog(on_return="cached totals will rebuild from Datastore")
            ),
        )
        # Kept as paths/registry.py keeps the threads' ones: never two for one counter.
        self._combiners: PerCounter[AsyncWriteCombiner] = PerCounter(AsyncWriteCombiner)

    def combiner(self, key: Hashable) -> AsyncWriteCombiner:
        return self._combiners.get(key)


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, AsyncBackend]] = (
    weakref.WeakKeyDictionary()
)


def async_backend_for(backend: Backend, settings: Settings) -> AsyncBackend:
    """The running loop's asyncio shell over ``backend`` (made on first use)."""
    loop = asyncio.get_running_loop()
    per_loop = _by_loop.setdefault(loop, {})
    found = per_loop.get(id(backend))
    if found is None or found.backend is not backend:
        found = per_loop[id(backend)] = AsyncBackend(backend, settings)
    return found


# Increments whose callers were cancelled, still running to their end: kept here so
# the loop does not drop them half-way (see ``AsyncCounter.increment``).
_finishing: set[asyncio.Task[Any]] = set()


def finish_in_background(task: asyncio.Task[Any]) -> None:
    """Let ``task`` (an increment whose caller was cancelled) run to its end."""
    if task.done():
        return
    _finishing.add(task)
    task.add_done_callback(_finished)


def _finished(task: asyncio.Task[Any]) -> None:
    _finishing.discard(task)
    if not task.cancelled():
        task.exception()  # its caller is gone: nobody else will look at it


async def drain() -> None:
    """Wait for the increments of the running loop whose callers were cancelled: they
    run on to their end (see ``AsyncCounter.increment``). ``aclose`` does this first."""
    loop = asyncio.get_running_loop()
    while True:
        left = [task for task in _finishing if task.get_loop() is loop and not task.done()]
        if not left:
            return
        await asyncio.wait(left)


def async_cache(settings: Settings, *, outage: OutageLog | None) -> AsyncCache:
    """The asyncio cache ``settings`` name: ``AsyncRedisCache`` for a Redis or Valkey
    server's ``cache_url``, ``AsyncRedisClusterCache`` for a cluster's, ``AsyncMemoryCache``
    for ``memory://``, else ``AsyncMemcache`` (memcached, or no cache at all)."""
    url = cache_url_of(settings)
    if url is not None and url.family == "memory":
        return AsyncMemoryCache(memory_cache(url.name))
    if url is None or not url.redis_protocol:
        return AsyncMemcache(settings, outage=outage)
    try:
        from .redis_cache import AsyncRedisCache
        from .redis_cluster import AsyncRedisClusterCache
    except ImportError as exc:
        raise ConfigurationError(
            f"{url.scheme}:// needs redis-py: pip install 'sharded-counter[redis]' ({exc})"
        ) from None
    if url.cluster:
        return AsyncRedisClusterCache(url, settings, outage=outage)
    return AsyncRedisCache(url, settings, outage=outage)


_memcache_by_loop: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[object, ...], AsyncCache]
] = weakref.WeakKeyDictionary()


def async_memcache_for(settings: Settings) -> AsyncCache:
    """The running loop's cache connections for the rate limiter and locks (one per
    cache and time limits); they log outages themselves."""
    loop = asyncio.get_running_loop()
    per_loop = _memcache_by_loop.setdefault(loop, {})
    key = cache_client_key(settings)
    found = per_loop.get(key)
    if found is None:
        found = per_loop[key] = async_cache(settings, outage=None)
    return found


@forget_at_fork
def _forget_loops() -> None:
    # A forked child must not use the channels and connections made for a loop of its
    # parent's: it opens its own on its next call. (A reconnect needs nothing here: its
    # new Backend gets a new AsyncBackend, and aclose still closes the old one.)
    _by_loop.clear()
    _memcache_by_loop.clear()
    _finishing.clear()


async def aclose() -> None:
    """Close the running loop's Datastore channels and memcache connections (made by
    ``AsyncCounter`` and the other asyncio helpers). Call it as the loop's work ends, in
    an app's shutdown (FastAPI's lifespan, say); anything used after it opens afresh.
    Increments whose callers were cancelled are waited for first (``drain``)."""
    await drain()
    loop = asyncio.get_running_loop()
    for backend in _by_loop.pop(loop, {}).values():
        await backend.shell.close()
    for memcache in _memcache_by_loop.pop(loop, {}).values():
        await memcache.close()
