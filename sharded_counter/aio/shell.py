"""The asyncio shell: carries out the effects of steps (core/effects.py) in an event loop.

paths/shell.py's twin. The steps are the same objects the blocking shell
drives; here a Datastore call is awaited on a ``grpc.aio`` channel
(``rpc.py``), a cache call on ``emcache`` (``memcache.py``) or
``redis.asyncio`` (``redis_cache.py``), a pause is
``asyncio.sleep``, steps side by side are gathered, and merges are batched
among tasks (``batches.py``). Nothing here decides anything about a count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..core.effects import Batched, Effect, Memcache, Rpc, Sleep, Steps, Together
from .batches import AsyncMergeBatches
from .cache_guard import AsyncCache
from .rpc import AsyncDatastoreRpc, AsyncMemoryRpc

T = TypeVar("T")


async def drive(steps: Steps[T], perform: Callable[[Effect], Awaitable[Any]]) -> T:
    """core/effects.py's ``drive`` as a coroutine: each effect is awaited through
    ``perform``, its result sent back or its error thrown in (a cancellation too: the
    steps clean up as they would after any error)."""
    try:
        effect = next(steps)
        while True:
            try:
                result = await perform(effect)
            except BaseException as exc:
                effect = steps.throw(exc)
            else:
                effect = steps.send(result)
    except StopIteration as stop:
        answer: T = stop.value
        return answer


def on_memcache(memcache: AsyncCache) -> Callable[[Effect], Awaitable[Any]]:
    """Carry out the effects of memcache-only steps (the rate limiter's, the locks'):
    calls of ``memcache``, and pauses."""

    async def perform(effect: Effect) -> Any:
        if isinstance(effect, Memcache):
            return await getattr(memcache, effect.method)(*effect.args)
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
            return None
        raise TypeError(f"memcache alone cannot carry out {effect!r}")

    return perform


class AsyncShell:
    """Runs steps to their end as a coroutine, on ``rpc`` and ``memcache``."""

    def __init__(self, rpc: AsyncDatastoreRpc | AsyncMemoryRpc, memcache: AsyncCache) -> None:
        self.rpc = rpc
        self.memcache = memcache
        self._batches: AsyncMergeBatches[Any] = AsyncMergeBatches()

    async def run(self, steps: Steps[T]) -> T:
        """Drive ``steps`` to their end (``drive``)."""
        return await drive(steps, self._perform)

    async def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Rpc):
            return await self.rpc.call(effect.method, effect.request)
        if isinstance(effect, Memcache):
            return await getattr(self.memcache, effect.method)(*effect.args)
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
            return None
        if isinstance(effect, Together):
            return list(await asyncio.gather(*(self.run(s) for s in effect.steps)))
        if isinstance(effect, Batched):
            merge = effect.merge
            await self._batches.merge(
                effect.key, effect.items, lambda taken: self.run(merge(taken))
            )
            return None
        raise TypeError(f"not an effect: {effect!r}")

    async def close(self) -> None:
        await self.rpc.close()
        await self.memcache.close()
