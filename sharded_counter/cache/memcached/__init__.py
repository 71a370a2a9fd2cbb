"""memcached as the cache: one server, or several as a failover cluster.

``connect`` builds the client for a list of servers. One server gets a pooled
pymemcache client that retries what a restarted server's stale sockets refuse.
Several get ``cluster.ClusterClient``: rendezvous hashing over the servers, a
failed server's keys moved to the others, and a server cleaned before it serves
again (``membership.py``, over the picture of the servers in ``ring.py``, listing
a server's keys with ``keydump.py``).
"""

from __future__ import annotations

from typing import Any

from pymemcache.client.base import PooledClient
from pymemcache.client.retrying import RetryingClient
from pymemcache.exceptions import MemcacheUnexpectedCloseError

from .cluster import ClusterClient

#: Seconds a failed server of a cluster is left alone before it is probed again.
DEAD_TIMEOUT = 5.0

_POOL_SIZE = 64  # sockets a client keeps open to one server at most

_CLOSED_BY_PEER = [
    MemcacheUnexpectedCloseError,
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
]


def connect(servers: list[tuple[str, int]], *, connect_timeout: float, timeout: float) -> Any:
    """A thread-safe client of ``servers`` (at least one): replies are always awaited
    (``default_noreply=False``: an ``add`` or ``cas`` that is not answered tells us
    nothing), and every call is bounded by the timeouts."""
    if len(servers) == 1:
        pooled = PooledClient(
            servers[0],
            connect_timeout=connect_timeout,
            timeout=timeout,
            no_delay=True,
            default_noreply=False,
            max_pool_size=_POOL_SIZE,
        )
        # After memcached restarts, every idle pooled socket fails once, and is dropped
        # from the pool. Their requests went to the process that died, so trying again
        # is safe, until a fresh socket answers: one try more than the pool can hold
        # stale sockets (a call that met one stale socket and then a second used to
        # fail). A timeout is not retried (the request may still be applied), nor is
        # a refused connection (the server is down: nothing stale is left to drop).
        return RetryingClient(pooled, attempts=_POOL_SIZE + 1, retry_for=_CLOSED_BY_PEER)
    return ClusterClient(
        servers,
        connect_timeout=connect_timeout,
        timeout=timeout,
        dead_timeout=DEAD_TIMEOUT,
        max_pool_size=_POOL_SIZE,
    )
