"""Which cache the settings name, and its client: the one place that chooses a backend.

A ``cache_url`` names memcached (``memcached://``), Redis or Valkey
(``redis://``, ``rediss://``, ``valkey://``, ``valkeys://``), or a Redis or Valkey
cluster (``redis+cluster://``, ``valkey+cluster://``, seeds ``h1:p1,h2:p2``), or this
process's own in-memory cache for tests (``memory://``, memory/backends.py); without one,
``memcached_hosts`` names memcached servers. redis-py is imported only when a URL
names a Redis or Valkey server, so the library still needs nothing beyond
pymemcache without one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.cache_url import CacheUrl, parse_cache_url
from ..errors import ConfigurationError
from ..settings import Settings, parse_host

if TYPE_CHECKING:
    from .redis.client import RedisClient
    from .redis.cluster import RedisClusterClient


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


def connect_cache(settings: Settings) -> Any:
    """The client of the cache ``settings`` name, or None when they name none."""
    url = cache_url_of(settings)
    if url is not None and url.family == "memory":
        from ..memory.backends import memory_cache

        return memory_cache(url.name)
    redis = redis_client_for(settings)
    if redis is not None:
        return redis
    servers = memcached_servers(settings)
    if not servers:
        return None
    from .memcached import connect

    return connect(
        servers,
        connect_timeout=settings.memcache_connect_timeout,
        timeout=settings.memcache_timeout,
    )


def tls_ca_file(settings: Settings) -> str | None:
    """``cache_ca_file``, once it is known to be a file this process can read (a
    ``ConfigurationError`` names it otherwise), or None to trust the system's CAs."""
    path = settings.cache_ca_file
    if path is None:
        return None
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigurationError(
            f"cache_ca_file {path!r} cannot be read: {exc.strerror or exc}"
        ) from None
    return path


def redis_client_for(settings: Settings) -> RedisClient | RedisClusterClient | None:
    """A ``RedisClient`` when ``cache_url`` names a Redis or Valkey server, a
    ``RedisClusterClient`` when it names a cluster, else None.

    Raises ``ConfigurationError`` when redis-py is not installed (the ``redis`` extra).
    """
    url = cache_url_of(settings)
    if url is None or not url.redis_protocol:
        return None
    try:
        from .redis.client import RedisClient
        from .redis.cluster import RedisClusterClient
    except ImportError as exc:
        raise ConfigurationError(
            f"{url.scheme}:// needs redis-py: pip install 'sharded-counter[redis]' ({exc})"
        ) from None
    if url.cluster:
        return RedisClusterClient(
            url.hosts,
            username=url.username,
            password=url.password,
            tls=url.tls,
            ca_file=tls_ca_file(settings) if url.tls else None,
            connect_timeout=settings.memcache_connect_timeout,
            timeout=settings.memcache_timeout,
        )
    ((host, port),) = url.hosts
    return RedisClient(
        host,
        port,
        db=url.db,
        username=url.username,
        password=url.password,
        tls=url.tls,
        ca_file=tls_ca_file(settings) if url.tls else None,
        connect_timeout=settings.memcache_connect_timeout,
        timeout=settings.memcache_timeout,
    )
