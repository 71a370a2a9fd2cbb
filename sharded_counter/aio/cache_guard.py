"""What an asyncio cache is to the shell, and the guard both asyncio caches share.

Two caches serve the asyncio shell: ``memcache.py`` (memcached, over emcache) and
``redis_cache.py`` (Redis or Valkey, over ``redis.asyncio``). Both answer the
calls of ``AsyncCache`` with memcached's meaning, so the cache tier's steps cannot
tell them apart, nor from the blocking ``GuardedClient``. ``CacheGuard`` is how
both turn a call's failure into a ``CacheUnavailable`` and keep the outage log.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from ..cache.client import OutageLog
from ..errors import CacheUnavailable

T = TypeVar("T")

#: What the shells do while the cache is out, said once in the outage log.
WHILE_OUT = "reading totals from Datastore until it returns"


class AsyncCache(Protocol):
    """The calls the asyncio shell and the patterns make on a cache (cache/guarded.py's,
    awaited). Every failure is a ``CacheUnavailable`` whose ``maybe_applied`` says
    whether a write may have landed."""

    @property
    def enabled(self) -> bool: ...
    async def close(self) -> None: ...
    async def gets(self, key: str) -> tuple[bytes | None, Any]: ...
    async def get(self, key: str) -> bytes | None: ...
    async def add(self, key: str, value: bytes, expire: int = 0, noreply: bool = False) -> bool: ...
    async def cas(
        self, key: str, value: bytes, cas: Any, expire: int = 0, noreply: bool = False
    ) -> bool: ...
    async def append(self, key: str, value: bytes) -> bool: ...
    async def delete(self, key: str) -> None: ...
    async def send(self, method: str, key: str) -> None: ...
    async def incr(self, key: str, value: int, noreply: bool = False) -> int | None: ...
    async def decr(self, key: str, value: int, noreply: bool = False) -> int | None: ...
    async def get_many(self, keys: list[str]) -> dict[str, bytes]: ...
    async def gets_many(self, keys: list[str]) -> dict[str, tuple[bytes, Any]]: ...


class CacheGuard:
    """Awaits a cache call, reading its failures as ``CacheUnavailable``.

    ``answers`` are exceptions that carry the server's answer (memcached's NOT_STORED,
    say): the caller reads them, and they show the server is up. A
    ``CacheUnavailable`` raised by the call already says what it means (an unsent
    call, or one whose ``maybe_applied`` the client set) and goes on as it is.
    ``failures`` become a ``CacheUnavailable`` whose ``maybe_applied`` is
    ``maybe_applied(method, exc)``. ``outage`` (None for callers that log on their
    own) hears of each failure, and of each answer unless ``heard`` is False.
    """

    def __init__(
        self,
        outage: OutageLog | None,
        *,
        answers: tuple[type[BaseException], ...],
        failures: tuple[type[BaseException], ...],
        maybe_applied: Callable[[str, BaseException], bool],
    ) -> None:
        self._outage = outage
        self._answers = answers
        self._failures = failures
        self._maybe_applied = maybe_applied

    async def __call__(self, method: str, call: Awaitable[T], *, heard: bool = True) -> T:
        sent = time.monotonic()
        try:
            result = await call
        except self._answers:
            if heard:
                self._answered(sent)
            raise
        except CacheUnavailable as exc:
            self._failed(exc)
            raise
        except self._failures as exc:
            # Client errors (emcache's timeouts) often say nothing in their text: name them.
            error = CacheUnavailable(
                f"memcache {method} failed: {type(exc).__name__}: {exc}".rstrip(": "),
                maybe_applied=self._maybe_applied(method, exc),
            )
            self._failed(error)
            raise error from exc
        if heard:
            self._answered(sent)
        return result

    def _answered(self, sent: float) -> None:
        if self._outage is not None:
            self._outage.answered(sent)

    def _failed(self, exc: BaseException) -> None:
        if self._outage is not None:
            self._outage.failed(exc, WHILE_OUT)
