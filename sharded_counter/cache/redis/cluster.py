"""pymemcache's calls, with memcached's meaning, on a Redis or Valkey cluster, from threads.

The same ``commands.Call``s as ``client.RedisClient`` sends to one server, each sent
to the primary that holds its key's hash slot. No key needs a hash tag: every
script reads and writes one key, and a multi-key read (``gets_many``) is split
into one ``MGET`` per slot (a cluster refuses an ``MGET`` across slots).

redis-py's ``RedisCluster`` keeps the topology (which node serves which slot) and
the connection pools of the nodes; the sending is done here, because a cluster
client's own retries would resend a call after a timeout or a lost connection, and
a write resent may apply twice. What may be done again, since nothing ran:

- a call that found no connection (refused, unreachable): the topology is read
  again, and the call goes to the slot's new primary if it has one;
- a ``MOVED`` or ``ASK`` redirect (the slot moved; the server ran nothing): the
  call follows it, up to ``MAX_REDIRECTS`` times.

A call sent and then unanswered (a timeout, a connection lost) is never sent
again: ``CacheTimedOut`` or ``CacheConnectionLost`` with ``maybe_applied`` for a
write, as from one server; the topology is read again before the next call, so
calls find a promoted replica once the cluster has made one. ``CLUSTERDOWN`` (no
live primary for a slot yet, during a failover), ``TRYAGAIN`` and redirects that
do not settle are ``ClusterRefused``: nothing ran.

A replica copies its primary asynchronously, so a promoted one may lack the last
writes its primary acknowledged. For a counter's cached record that means a total
missing increments, trusted as complete. So when a node starts serving slots that
another served before (a failover, seen on a topology reading or in a ``MOVED``),
every counter record on it (``<prefix>:t:<40 hex>``) is deleted before this client
sends it anything else, as the memcached cluster does with a server that rejoins: a
missing record is always safe, the next reader rebuilds it from the shards. Stashes
(``delayed_incr``) are acknowledged increments and are kept; what they can lose is
in docs/limits.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.retry import Retry

from . import commands, slots
from .client import RedisCalls, exchange
from .commands import CacheNotReached, Call
from .slots import MAX_REDIRECTS, MIN_REFRESH_INTERVAL, SCAN_COUNT, ClusterRefused

__all__ = ["MAX_REDIRECTS", "SCAN_COUNT", "ClusterRefused", "RedisClusterClient"]


class RedisClusterClient(RedisCalls):
    """pymemcache's calls, with memcached's meaning, on a Redis or Valkey cluster.

    ``nodes`` are the seeds: any one that answers tells the rest. Nothing connects
    until the first call, so a client made while the cluster is down is no error.
    """

    def __init__(
        self,
        nodes: Iterable[tuple[str, int]],
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        connect_timeout: float = 0.5,
        timeout: float = 0.5,
        max_pool_size: int = 64,
    ) -> None:
        self.seeds = list(nodes)
        if not self.seeds:
            raise ValueError("a cluster client needs at least one node to start from")
        self._options: dict[str, Any] = {
            "username": username,
            "password": password,
            "socket_timeout": timeout,
            "socket_connect_timeout": connect_timeout,
            # Each node's pool: at most max_pool_size connections, a call waiting up
            # to ``timeout`` for a free one.
            "connection_pool_class": redis.BlockingConnectionPool,
            "max_connections": max_pool_size,
            "timeout": timeout,
        }
        if tls:
            self._options["ssl"] = True
            if ca_file:  # else the system's CAs
                self._options["ssl_ca_certs"] = ca_file
        self._lock = threading.Lock()
        self._cluster: RedisCluster | None = None
        self._stale = False  # a failure asked for the topology to be read again
        self._refreshed_at = float("-inf")
        # Promoted primaries whose counter records are still to be deleted (by name).
        self._unclean: set[str] = set()

    def __repr__(self) -> str:
        seeds = ",".join(f"{host}:{port}" for host, port in self.seeds)
        return f"RedisClusterClient({seeds!r})"

    def close(self) -> None:
        """Close every connection; the next call reads the topology and connects again."""
        with self._lock:
            cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.close()

    # -- reads across slots -------------------------------------------------------------------

    def gets_many(self, keys: Iterable[str | bytes]) -> dict[Any, tuple[bytes, bytes]]:
        """One ``MGET`` per hash slot of ``keys``, the answers merged."""
        found: dict[Any, tuple[bytes, bytes]] = {}
        for group in slots.by_slot(list(keys)).values():
            _, call = commands.gets_many(group)
            assert call is not None  # a group has a key
            found.update(self._perform(call))
        return found

    # -- talking to the cluster -----------------------------------------------------------

    def _send(self, call: Call, command: tuple[Any, ...]) -> Any:
        """Send ``command`` to the primary of its key's slot, following redirects."""
        key = call.key if call.script is not None else command[1]
        slot = slots.slot_of(key)
        cluster = self._topology(call)
        asked: ClusterNode | None = None  # where an ASK redirect sent the call
        for _ in range(1 + MAX_REDIRECTS):
            node = asked or self._primary(cluster, slot, call)
            if node.name in self._unclean:
                cluster = self._topology(call)  # cleans it first, or raises
            try:
                return self._send_to(cluster, node, call, command, asking=asked is not None)
            except MovedError as moved:
                self._move_slot(cluster, moved)
                asked = None
            except AskError as ask:
                asked = self._node_at(cluster, ask.host, ask.port)
            except TryAgainError as busy:
                raise ClusterRefused(f"redis {call.name}: {busy}", maybe_applied=False) from busy
            except ClusterDownError as down:
                self._stale = True
                raise ClusterRefused(f"redis {call.name}: {down}", maybe_applied=False) from down
            except CacheNotReached:
                # Never sent. The node may be gone for good (a primary that failed
                # over): read the topology again, and go on only if the slot moved.
                cluster = self._topology(call, refresh=True)
                if asked is None and self._primary(cluster, slot, call).name == node.name:
                    raise
                asked = None
        raise ClusterRefused(
            f"redis {call.name}: slot {slot} still redirected after {MAX_REDIRECTS} redirects",
            maybe_applied=False,
        )

    def _send_to(
        self,
        cluster: RedisCluster,
        node: ClusterNode,
        call: Call,
        command: tuple[Any, ...],
        *,
        asking: bool,
    ) -> Any:
        pool = cluster.get_redis_connection(node).connection_pool
        try:
            connection = pool.get_connection()
        except RedisError as exc:
            self._stale = True
            raise CacheNotReached(
                f"redis {call.name} at {node.name}: {exc}", maybe_applied=False
            ) from exc
        try:
            if asking:
                exchange(connection, call, ("ASKING",), answers=slots.RAN_NOTHING)
            return exchange(connection, call, command, answers=slots.RAN_NOTHING)
        except (commands.CacheConnectionLost, commands.CacheTimedOut):
            self._stale = True  # the node may be down: look again before the next call
            raise
        finally:
            pool.release(connection)

    def _primary(self, cluster: RedisCluster, slot: int, call: Call) -> ClusterNode:
        try:
            return cluster.nodes_manager.get_node_from_slot(slot)
        except RedisClusterException as exc:  # SlotNotCoveredError is one
            self._stale = True
            raise ClusterRefused(f"redis {call.name}: {exc}", maybe_applied=False) from exc

    def _move_slot(self, cluster: RedisCluster, moved: MovedError) -> None:
        """Point the slot at the node ``MOVED`` named; a node that now serves slots it
        did not serve before is to be cleaned before it gets a call."""
        with self._lock:
            before = _serving_primaries(cluster)
            cluster.nodes_manager.move_slot(moved)
            self._unclean |= slots.newly_serving(before, _serving_primaries(cluster))

    @staticmethod
    def _node_at(cluster: RedisCluster, host: str, port: int) -> ClusterNode:
        host, port = cluster.nodes_manager.remap_host_port(host, port)
        known: ClusterNode | None = cluster.get_node(host=host, port=port)  # type: ignore[no-untyped-call]
        return known or ClusterNode(host, port)  # type: ignore[no-untyped-call]

    def _topology(self, call: Call, *, refresh: bool = False) -> RedisCluster:
        """redis-py's view of the cluster, made on first use and read again when a
        failure asked for it (at most every ``MIN_REFRESH_INTERVAL`` seconds)."""
        with self._lock:
            stale = refresh or self._stale
            if self._cluster is not None and not stale:
                return self._clean(self._cluster, call)
            if self._cluster is not None and self._refresh_too_soon():
                return self._clean(self._cluster, call)
            try:
                if self._cluster is None:
                    self._cluster = self._connect()
                else:
                    before = _serving_primaries(self._cluster)
                    self._cluster.nodes_manager.initialize()
                    after = _serving_primaries(self._cluster)
                    self._unclean |= slots.newly_serving(before, after)
            except (RedisError, RedisClusterException) as exc:
                raise CacheNotReached(
                    f"redis {call.name}: no node of the cluster answered: {exc}",
                    maybe_applied=False,
                ) from exc
            finally:
                self._refreshed_at = time.monotonic()
            self._stale = False
            return self._clean(self._cluster, call)

    def _clean(self, cluster: RedisCluster, call: Call) -> RedisCluster:
        """Delete the counter records on every promoted primary not cleaned yet (the
        lock held: no call of this client reaches it meanwhile). A node that fails
        the clean-up stays to be cleaned, and this call is ``ClusterRefused``."""
        for name in sorted(self._unclean):
            node = cluster.get_node(node_name=name)  # type: ignore[no-untyped-call]
            if node is None:  # gone from the topology: nothing will reach it
                self._unclean.discard(name)
                continue
            try:
                _delete_records(cluster.get_redis_connection(node))
            except RedisError as exc:
                self._stale = True
                raise ClusterRefused(
                    f"redis {call.name}: {name} was promoted and its counter records "
                    f"could not be deleted yet: {exc}",
                    maybe_applied=False,
                ) from exc
            self._unclean.discard(name)
        return cluster

    def _refresh_too_soon(self) -> bool:
        return time.monotonic() - self._refreshed_at < MIN_REFRESH_INTERVAL

    def _connect(self) -> RedisCluster:
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in self.seeds],  # type: ignore[no-untyped-call]
            # No retries of redis-py's: a call is sent once (see the module's note).
            retry=Retry(NoBackoff(), 0),
            **self._options,
        )


def _serving_primaries(cluster: RedisCluster) -> set[str]:
    """The names of the nodes that serve some slot, as ``cluster`` last read them."""
    return {nodes[0].name for nodes in cluster.nodes_manager.slots_cache.values() if nodes}


def _delete_records(node: redis.Redis) -> int:
    """Delete every counter record on ``node`` (one ``SCAN`` pass, matching keys
    deleted as they come); returns how many."""
    deleted = 0
    batch: list[bytes] = []
    for key in node.scan_iter(match=slots.RECORD_MATCH, count=SCAN_COUNT):
        if slots.is_record(key):
            batch.append(key)
        if len(batch) >= SCAN_COUNT:
            deleted += _unlink(node, batch)
    return deleted + _unlink(node, batch)


def _unlink(node: redis.Redis, keys: list[bytes]) -> int:
    """``UNLINK`` each of ``keys`` (one command per key: they may be in different
    slots), in one pipeline; empties the list."""
    pipe = node.pipeline(transaction=False)
    for key in keys:
        pipe.unlink(key)
    removed = sum(int(n) for n in pipe.execute()) if keys else 0
    keys.clear()
    return removed
