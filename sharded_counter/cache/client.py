"""The cache protocol the tier speaks, the client built from settings, and what its users share.

``MemcacheClient`` and ``CommandClient`` are the calls every backend answers, with
memcached's meaning (pymemcache's calls). Which backend the settings name is
``by_url.py``'s choice: ``memcached/`` (one server, or a failover cluster) or
``redis/`` (Redis or Valkey). Here: one client per process for the helpers
(``ClientSource``), an outage logged once (``OutageLog``), and ``incr`` that
creates its key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from typing import Any, Protocol

from pymemcache.exceptions import MemcacheError

from ..core.effects import Memcache, Steps
from ..errors import CacheUnavailable, ConfigurationError
from ..process import check_given_here, forget_at_fork, forget_connections
from ..settings import Settings, resolve
from ..telemetry import telemetry
from .by_url import connect_cache

log = logging.getLogger("sharded_counter")

#: What a memcache call raises when the cache, not the caller, is at fault:
#: pymemcache's errors, and socket errors (refused, reset, timed out).
CLIENT_ERRORS: tuple[type[BaseException], ...] = (MemcacheError, OSError)


class MemcacheClient(Protocol):
    """The calls the cache tier makes; both pymemcache clients provide them."""

    def get_many(self, keys: list[str]) -> dict[str, bytes]: ...
    def gets(self, key: str) -> tuple[bytes | None, Any]: ...
    def gets_many(self, keys: list[str]) -> dict[str, tuple[bytes, Any]]: ...
    def cas(
        self, key: str, value: bytes, cas: Any, expire: int = 0, noreply: bool = False
    ) -> Any: ...
    def add(self, key: str, value: bytes, expire: int = 0, noreply: bool = False) -> bool: ...
    def delete(self, key: str, noreply: bool = False) -> bool: ...


class CommandClient(MemcacheClient, Protocol):
    """The cache tier's calls plus the counters and plain reads that the rate
    limiter, time series and locks use; both pymemcache clients provide them."""

    def get(self, key: str) -> bytes | None: ...
    def incr(self, key: str, value: int, noreply: bool = False) -> int | None: ...
    def decr(self, key: str, value: int, noreply: bool = False) -> int | None: ...


def cache_client_key(settings: Settings) -> tuple[Any, ...]:
    """What makes two clients of the cache the same: its servers and time limits."""
    return (
        settings.memcached_hosts,
        settings.cache_url,
        settings.cache_ca_file,
        settings.memcache_timeout,
        settings.memcache_connect_timeout,
    )


def build_client(settings: Settings) -> MemcacheClient | None:
    """The client for ``settings.memcached_hosts``, or None when none are configured."""
    client: MemcacheClient | None = _make_client(settings)
    return client


def _make_client(settings: Settings) -> Any:
    return connect_cache(settings)


# -- one client per process for the rate limiter, time series and locks ------------------

_shared_lock = threading.Lock()
_shared: dict[tuple[Any, ...], Any] = {}


@forget_connections
def _forget_shared() -> None:
    _shared.clear()  # sockets must not be shared with a parent


@forget_at_fork
def _new_lock_after_fork() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()  # a parent's thread may have held it


class ClientSource:
    """Where a rate limiter, time series or lock gets its client on each call.

    The caller's own client if one was given (refused in a forked child: its sockets
    are the parent's). Otherwise the process-wide client for the resolved settings,
    looked up per call so that a helper made before a ``fork`` uses the child's own
    sockets, not its parent's.
    """

    def __init__(
        self,
        client: CommandClient | None,
        *,
        memcached_hosts: str | list[str] | tuple[str, ...] | None = None,
        cache_url: str | None = None,
        key_prefix: str | None = None,
        settings: Settings | None = None,
        what: str,
    ) -> None:
        if settings is None:  # else the caller's own, resolved already (the whole cache)
            options: dict[str, Any] = {}
            if memcached_hosts is not None:
                options["memcached_hosts"] = memcached_hosts
            if cache_url is not None:
                options["cache_url"] = cache_url
            if key_prefix is not None:
                options["key_prefix"] = key_prefix
            settings = resolve(options)
        self.settings = settings
        self._client = client
        self._given_in = os.getpid()
        if client is None and not (self.settings.memcached_hosts or self.settings.cache_url):
            raise ConfigurationError(
                f"{what} needs a cache: set MEMCACHED_HOSTS (or memcached_hosts), "
                "SHARDED_COUNTER_CACHE_URL (or cache_url), or pass memcache_client"
            )

    @property
    def key_prefix(self) -> str:
        return self.settings.key_prefix

    def __call__(self) -> CommandClient:
        if self._client is not None:
            check_given_here(self._given_in, "memcache_client")
            return self._client
        s = self.settings
        key = cache_client_key(s)
        client = _shared.get(key)
        if client is None:
            with _shared_lock:
                client = _shared.get(key)
                if client is None:
                    client = _shared[key] = _make_client(s)
        shared: CommandClient = client
        return shared


class OutageLog:
    """Logs a memcache outage once when it starts and once when it ends, not per call.

    ``what`` names who noticed (empty for the counters' cache tier); ``on_return``
    says what follows once memcache answers again. Shared by the cache tier and
    the rate limiter: many threads report each call, so the state changes under a
    lock and only the thread that changes it logs.
    """

    def __init__(self, what: str = "", *, on_return: str = "") -> None:
        self._prefix = f"{what}: " if what else ""
        self._on_return = f"; {on_return}" if on_return else ""
        self._down = False
        self._since = 0.0  # monotonic time the outage began
        self._lock = threading.Lock()

    def failed(self, exc: BaseException, consequence: str) -> None:
        if self._down:  # a plain read: the common case (still down) takes no lock
            return
        with self._lock:
            if self._down:
                return
            self._down, self._since = True, time.monotonic()
        telemetry().events({"memcache_outages": 1})
        log.warning("%smemcache is unavailable (%s); %s", self._prefix, exc, consequence)

    def answered(self, sent: float) -> None:
        """A call sent at ``sent`` (``time.monotonic()``) was answered. It ends an
        outage only if it was sent after the outage began: a call in flight when
        memcache went down may still come back, and says nothing of memcache now."""
        if not self._down or sent < self._since:
            return
        with self._lock:
            if not self._down or sent < self._since:
                return
            self._down = False
        log.warning("%smemcache answers again%s", self._prefix, self._on_return)


def key_digest(*parts: str) -> str:
    """40 hex characters naming ``parts``: BLAKE2, as ``keys.cache_keys`` names counters.

    Any unicode goes in and a short, printable ASCII key part comes out. Each part
    is length-prefixed, so no two different tuples hash the same input, even
    when the parts themselves contain separators or NULs.
    """
    joined = "".join(f"{len(part)}:{part}" for part in parts)
    return hashlib.blake2b(joined.encode(), digest_size=20).hexdigest()


#: ``incr`` and ``add`` rounds before a counter that keeps vanishing counts as an outage.
_INCR_ATTEMPTS = 8


class KeyKeptVanishing(CacheUnavailable, MemcacheError):  # type: ignore[misc]  # untyped base
    """A counter key was evicted again between every ``incr`` and ``add``: an outage in
    all but name (a ``CacheUnavailable``, and a pymemcache ``MemcacheError`` as the
    blocking helpers' callers expect of a failed call)."""


def incr_or_add(key: str, amount: int, expire: int) -> Steps[int]:
    """Add ``amount`` to the counter at ``key``, creating it with ``expire``; return the sum.

    memcached's ``incr`` answers None for a missing key and never creates one.
    Creating it with ``set`` would race: two first hits would both set, and one
    would be lost. ``add`` creates it only if it is still missing. Whoever loses
    that race increments the key the winner made. Only the creator sets the
    expiry, so the key dies when its window or bucket does, however often it is
    incremented.

    Not ``cas.change_key``: ``incr`` changes the value on the server in one step,
    so no read and no cas token are needed, and concurrent hitters never lose a
    race to each other; the loop only covers the key vanishing between the two.
    """
    for _ in range(_INCR_ATTEMPTS):
        value = yield Memcache("incr", (key, amount, False))
        if value is not None:
            return int(value)
        added = yield Memcache("add", (key, str(amount).encode(), expire, False))
        if added is True:
            return amount
    # Created and evicted again between every try: treat it like an outage.
    raise KeyKeptVanishing(f"could not increment {key}: it kept vanishing")
