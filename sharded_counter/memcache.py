"""Building the memcache client from settings.

One server gets a ``PooledClient``; several get a ``HashClient`` that spreads
keys over them with pooling on. Either way each thread borrows its own
connection (pymemcache's base ``Client`` is not thread-safe), replies are
always awaited (``default_noreply=False``: an ``add`` or ``cas`` that is not
answered tells us nothing), and every call is bounded by the timeouts.
"""

from __future__ import annotations

from typing import Any, Protocol

from pymemcache.client.base import PooledClient
from pymemcache.client.hash import HashClient

from .config import Settings, parse_host


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


def build_client(settings: Settings) -> MemcacheClient | None:
    """The client for ``settings.memcached_hosts``, or None when none are configured."""
    servers = [parse_host(h) for h in settings.memcached_hosts]
    if not servers:
        return None
    common: dict[str, Any] = {
        "connect_timeout": settings.memcache_connect_timeout,
        "timeout": settings.memcache_timeout,
        "no_delay": True,
        "default_noreply": False,
    }
    if len(servers) == 1:
        client: MemcacheClient = PooledClient(servers[0], max_pool_size=64, **common)
        return client
    hashed: MemcacheClient = HashClient(
        servers, use_pooling=True, max_pool_size=64, retry_attempts=1, dead_timeout=5, **common
    )
    return hashed
