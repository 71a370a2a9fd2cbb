"""``AsyncRateLimiter``: patterns/ratelimit.py's limits for asyncio, on the same keys.

The counting is ``LimiterRules``' steps, the very ones ``RateLimiter`` drives, so
blocking and asyncio processes hitting one key share one allowance. Here each
memcache call is awaited on ``emcache`` (``memcache.py``), routed to the same
server as the blocking client's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from ..core.effects import Effect
from ..errors import CacheUnavailable
from ..patterns.ratelimit import (
    Decision,
    Limit,
    LimiterRules,
    OnOutage,
    RateLimited,
    Strategy,
    check_cost,
    check_key,
)
from .backend import async_memcache_for
from .shell import drive, on_memcache

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["AsyncRateLimiter"]


class AsyncRateLimiter(LimiterRules):
    """``RateLimiter`` for asyncio: the same limits, strategies, keys, outage behaviour
    (``on_outage``) and errors, with ``await hit(...)``, ``await test(...)`` and a
    decorator for coroutine functions. Needs a cache (``cache_url`` or
    ``memcached_hosts``, else the settings'): it makes its own asyncio connections,
    so it takes no blocking ``memcache_client``."""

    def __init__(
        self,
        limit: Limit | str,
        *,
        strategy: Strategy = "fixed",
        memcached_hosts: str | list[str] | tuple[str, ...] | None = None,
        cache_url: str | None = None,
        key_prefix: str | None = None,
        on_outage: OnOutage = "open",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            limit,
            strategy=strategy,
            memcached_hosts=memcached_hosts,
            cache_url=cache_url,
            key_prefix=key_prefix,
            on_outage=on_outage,
            clock=clock,
        )

    async def hit(self, key: str, cost: int = 1) -> Decision:
        """Spend ``cost`` on ``key`` if the limit allows it; say whether it did."""
        digest, cost = check_key(key), check_cost(cost)
        window = self._window()
        sent = time.monotonic()
        try:
            decision = await drive(self._hit(digest, cost, window), self._perform())
        except CacheUnavailable as exc:
            return self._unavailable(exc, window, cost)
        self._outage.answered(sent)
        return decision

    async def test(self, key: str, cost: int = 1) -> Decision:
        """Would ``hit(key, cost)`` be allowed now? Spends nothing."""
        digest, cost = check_key(key), check_cost(cost)
        window = self._window()
        sent = time.monotonic()
        try:
            current, previous = await drive(self._read(digest, window), self._perform())
        except CacheUnavailable as exc:
            return self._unavailable(exc, window, cost)
        self._outage.answered(sent)
        return self._tested(current, previous, window, cost)

    def limit(
        self, key_func: Callable[P, str], *, cost: int = 1
    ) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
        """Decorate a coroutine function so each call hits ``key_func(*args, **kwargs)``;
        a call over the limit raises ``RateLimited`` and the function does not run."""
        check_cost(cost)

        def decorate(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
            @functools.wraps(func)
            async def limited(*args: P.args, **kwargs: P.kwargs) -> R:
                key = key_func(*args, **kwargs)
                decision = await self.hit(key, cost)
                if not decision.allowed:
                    raise RateLimited(key, decision)
                return await func(*args, **kwargs)

            return limited

        return decorate

    def _perform(self) -> Callable[[Effect], Awaitable[Any]]:
        return on_memcache(async_memcache_for(self._client.settings))
