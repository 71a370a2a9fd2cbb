"""The cache client a ``cache_url`` names: what ``client.build_client`` will ask first.

Not wired in yet (docs/cache-backends.md). The hook is meant to sit at the top of
``client._make_client``::

    redis_client = redis_client_for(settings)
    if redis_client is not None:
        return redis_client
    servers = memcached_servers(settings)   # in place of parsing memcached_hosts

redis-py is imported only when a URL names a Redis or Valkey server, so the
library still needs nothing beyond pymemcache without one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.cache_url import CacheUrl, parse_cache_url
from ..errors import ConfigurationError
from ..settings import Settings, parse_host

if TYPE_CHECKING:
    from .redis_client import RedisClient


def cache_url_of(settings: Settings) -> CacheUrl | None:
    """The parsed ``cache_url``, or None when it is not set."""
    return parse_cache_url(settings.cache_url) if settings.cache_url else None


def memcached_servers(settings: Settings) -> list[tuple[str, int]]:
    """The memcached servers to use: a ``memcached://`` URL's hosts, else
    ``memcached_hosts`` (a URL, when set, wins over ``memcached_hosts``)."""
    url = cache_url_of(settings)
    if url is None:
        return [parse_host(h) for h in settings.memcached_hosts]
    return list(url.hosts) if url.family == "memcached" else []


def redis_client_for(settings: Settings) -> RedisClient | None:
    """A ``RedisClient`` when ``cache_url`` names a Redis or Valkey server, else None.

    Raises ``ConfigurationError`` for what is not built yet (cluster mode) and when
    redis-py is not installed (the ``redis`` extra).
    """
    url = cache_url_of(settings)
    if url is None or not url.redis_protocol:
        return None
    if url.cluster:
        raise ConfigurationError(
            f"{url.scheme}:// is not supported yet: only one Redis or Valkey server "
            "(redis://, rediss://, valkey://, valkeys://) can be the cache for now"
        )
    try:
        from .redis_client import RedisClient
    except ImportError as exc:
        raise ConfigurationError(
            f"{url.scheme}:// needs redis-py: pip install 'sharded-counter[redis]' ({exc})"
        ) from None
    ((host, port),) = url.hosts
    return RedisClient(
        host,
        port,
        db=url.db,
        username=url.username,
        password=url.password,
        tls=url.tls,
        connect_timeout=settings.memcache_connect_timeout,
        timeout=settings.memcache_timeout,
    )
