"""The session's cache as anyone with access to it sees it, whichever kind it is.

Tests that write straight into the cache (garbage at a key the library reads, a value
planted before a call) or reach it through a relay use these, so the same test runs
with memcached and with Redis as the cache (``--sc-cache``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from sharded_counter.cache.redis.client import RedisClient
from sharded_counter_emulator import Memcached, RedisCluster, RedisServer


class RawRedis:
    """What another program with access to the Redis server can do, with pymemcache's
    calls: ``set`` is a plain Redis ``SET`` (a value with no cas unique of ours, which
    the library must read as data, as anything at a memcached key is); every other
    call is the library's own client, so ``get`` reads back what the library wrote."""

    def __init__(self, plain: Any, ours: Any) -> None:
        self._plain = plain  # a redis-py client: a server's, or a cluster's
        self._ours = ours

    def set(self, key: str, value: bytes, expire: int = 0) -> bool:
        return bool(self._plain.set(key, value, ex=expire or None))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ours, name)

    def close(self) -> None:
        self._plain.close()
        self._ours.close()


def raw_client(server: Memcached | RedisServer | RedisCluster | str) -> Any:
    """A plain client of the test's own for ``server`` (or its cache URL, which a
    spawned process can be handed), replies on (a write without one may reach the
    server after the read that follows it)."""
    text = server if isinstance(server, str) else server.url
    if "+cluster://" in text:
        return _raw_cluster(text)
    url = urlsplit(text)
    assert url.hostname is not None and url.port is not None, url
    if url.scheme in ("redis", "valkey"):
        import redis

        password = unquote(url.password) if url.password is not None else None
        plain = redis.Redis(host=url.hostname, port=url.port, password=password)
        return RawRedis(plain, RedisClient(url.hostname, url.port, password=password))
    assert url.scheme == "memcached", url
    from pymemcache.client.base import Client

    return Client((url.hostname, url.port), default_noreply=False)


def _raw_cluster(url: str) -> RawRedis:
    """``RawRedis`` on a cluster (a ``+cluster://`` URL with no credentials)."""
    from redis.cluster import ClusterNode, RedisCluster

    from sharded_counter.cache.redis.cluster import RedisClusterClient
    from sharded_counter.core.cache_url import parse_cache_url

    hosts = parse_cache_url(url).hosts
    plain = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in hosts])
    return RawRedis(plain, RedisClusterClient(hosts))


def cache_url_through(server: Memcached | RedisServer, host: str, port: int) -> str:
    """``server``'s cache URL with ``host:port`` (a relay in front of it) in its place."""
    return server.url.replace(server.address, f"{host}:{port}", 1)


def dead_cache_url(server: Memcached | RedisServer | RedisCluster, port: int) -> str:
    """A cache URL of ``server``'s kind where nothing listens (``port`` is free)."""
    scheme = server.url.split("://", 1)[0]
    return f"{scheme}://127.0.0.1:{port}"
