"""Several memcached servers as one cache: consistent hashing, failover, safe rejoining.

Keys are spread over the servers by rendezvous hashing, through pymemcache's pooled
``HashClient``. What this subclass changes is what a failure does.

pymemcache retries a failing server a few times and, between tries, answers with
silent defaults (``None``, ``False``, ``{}``) even with ``ignore_exc=False``; then it
drops the server and later adds it back as if nothing happened. For our counters
both are dangerous. A merge that silently did nothing leaves a complete cache
record without a write, and nobody marks it suspect. A server that comes back
serves records that missed every write made while it was away.

Here:

* A server that fails a call leaves the ring at once and its keys move to the
  others. Before they move, the counter records on the servers that will take
  them are deleted: a record there may be left over from an earlier outage and
  would be trusted as complete. A missing record is always safe: the next reader
  rebuilds it from the shards.
* Reads are retried on the key's new home. A write is retried there only when
  the failure shows the first server never applied it (refused, or the
  connection was closed under us, which a killed server does). After a timeout
  the outcome is unknown, so the error is raised. ``cas`` is never moved: its
  token belongs to the server that issued it (see ``CasToken``).
* A server that is down is skipped, and probed again after ``dead_timeout``
  seconds. Before it takes traffic again every counter record on it is deleted,
  because it missed writes. ``delayed_incr`` stashes, which are acknowledged
  increments, are never deleted: any stashed meanwhile on the other servers
  for keys that go home to it are moved into it. Flushing the server would be
  simpler, but a paused server comes back with its stashes, and a flush would
  drop them.
* While a server is leaving or rejoining, the keys it owns fail fast with
  ``ServerUnavailable`` instead of going anywhere.
* ``delete`` of a stash key whose home is down raises instead of moving: the
  stash on the absent server would outlive the delete and come back with it.

Counter records and stashes are recognized by the shape of their keys
(``keys.cache_keys``: ``<prefix>:t:<40 hex>`` and ``<prefix>:delayed_incr:<40 hex>``),
so counters with any ``key_prefix`` are covered. Other keys (rate-limit windows,
time-series buckets, locks) are plain cache data. Whatever was written on a
stand-in server stays there, and goes out of view when the home server returns.

The keys on a server are listed with ``lru_crawler metadump all`` (memcached
1.4.31 and later). A server that cannot list its keys is kept out of the ring,
and an error is logged, rather than let back with records we could not check.

This module routes each call and fails it over; ``membership.py`` takes servers
out and brings them back, cleaning them; ``ring.py`` holds the picture of the
servers both share, and ``keydump.py`` lists a server's keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pymemcache.client.base import PooledClient, check_key_helper
from pymemcache.client.hash import HashClient
from pymemcache.client.rendezvous import RendezvousHash

from .membership import Membership
from .ring import (
    RECORD_KEY,
    STASH_KEY,
    CasToken,
    ServerUnavailable,
    check_stash_delete,
    connection_lost,
    may_fail_over,
    never_applied,
    route,
    token_is_current,
)

__all__ = ["RECORD_KEY", "STASH_KEY", "CasToken", "ClusterClient", "ServerUnavailable"]


class ClusterClient(HashClient):  # type: ignore[misc]  # pymemcache is untyped
    """A pooled ``HashClient`` that fails over, never answers silent defaults, and
    cleans a server before it serves again (see the module docstring).

    ``dead_timeout`` is how long a failed server is left alone before it is probed.
    ``drain`` is how long a rejoin waits for calls already on their way to the
    stand-in servers before it moves stashes (default: ``timeout``).
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        *,
        connect_timeout: float,
        timeout: float,
        dead_timeout: float = 5.0,
        drain: float | None = None,
        max_pool_size: int = 64,
    ) -> None:
        super().__init__(
            list(servers),
            connect_timeout=connect_timeout,
            timeout=timeout,
            no_delay=True,
            use_pooling=True,
            max_pool_size=max_pool_size,
            dead_timeout=dead_timeout,
            ignore_exc=False,
            default_noreply=False,
        )
        # Named as HashClient names its pools ("host:port"), so self.clients[name] works.
        self._addresses = {f"{host}:{port}": (host, port) for host, port in servers}
        self._all = RendezvousHash(nodes=list(self._addresses))
        self._members = Membership(
            self._addresses,
            self.clients,
            new_pool=self._fresh_pool,
            connect_timeout=connect_timeout,
            timeout=timeout,
            dead_timeout=dead_timeout,
            drain=timeout if drain is None else drain,
        )

    # -- looking at the cluster ----------------------------------------------------

    @property
    def servers(self) -> tuple[str, ...]:
        """Every configured server, ``host:port``."""
        return tuple(self._addresses)

    def server_states(self) -> dict[str, str]:
        """Each server's state: "up", "leaving", "down" or "joining"."""
        return {name: state.value for name, state in self._members.view.states.items()}

    def server_for(self, key: str) -> str | None:
        """The server ``key`` goes to now (None when every server is down)."""
        return self._members.view.home(key)

    # -- routing ---------------------------------------------------------------------

    def _route(self, key: str) -> tuple[str, Any, int]:
        check_key_helper(key, self.allow_unicode_keys, self.key_prefix)
        self._members.maybe_rejoin()
        home, generation = route(self._members.view, key)
        return home, self.clients[home], generation

    def _get_client(self, key: str) -> Any:
        # What HashClient's own helpers call; everything we use goes through _route.
        return self._route(key)[1]

    def _safely_run_func(
        self, client: Any, func: Callable[..., Any], default_val: Any, *args: Any, **kwargs: Any
    ) -> Any:
        # HashClient runs close/flush_all/quit through here. No silent defaults.
        return func(*args, **kwargs)

    def _fresh_pool(self, server: str) -> Any:
        pool = PooledClient(self._addresses[server], **self.default_kwargs)
        pool.client_class = self.client_class
        return pool

    # -- commands ------------------------------------------------------------------
    #
    # A call whose server fails is made once more, at the key's new home, when that
    # is safe. Not a retry loop: the second call goes to another server (the first
    # has left the ring by then), and there is no third.

    def _run_cmd(self, cmd: str, key: str, default_val: Any, *args: Any, **kwargs: Any) -> Any:
        if cmd == "delete":
            check_stash_delete(self._members.view, self._all, key)
        try:
            return self._run_at_home(cmd, key, *args, **kwargs)
        except Exception as exc:
            if not (connection_lost(exc) and may_fail_over(cmd, key, unapplied=never_applied(exc))):
                raise
        return self._run_at_home(cmd, key, *args, **kwargs)

    def _run_at_home(self, cmd: str, key: str, *args: Any, **kwargs: Any) -> Any:
        server, pool, generation = self._route(key)
        try:
            result = getattr(pool, cmd)(key, *args, **kwargs)
        except Exception as exc:
            if connection_lost(exc):
                self._members.failed(server, generation, exc)
            raise
        if cmd == "gets":
            value, token = result
            return (value, None if value is None else CasToken(server, generation, token))
        return result

    def cas(
        self, key: str, value: Any, cas: Any, expire: int = 0, noreply: bool | None = None
    ) -> Any:
        server, pool, generation = self._route(key)
        if isinstance(cas, CasToken):
            if not token_is_current(cas, server, generation):
                return False  # read from another server, or an earlier life of this one
            cas = cas.value
        try:
            return pool.cas(key, value, cas, expire, noreply)
        except Exception as exc:
            if not connection_lost(exc):
                raise
            self._members.failed(server, generation, exc)
            if never_applied(exc):
                return False
            raise

    def get_many(self, keys: Iterable[str], gets: bool = False, *args: Any, **kwargs: Any) -> Any:
        found: dict[str, Any] = {}
        failure = self._fetch(list(keys), gets, found, *args, **kwargs)
        if failure is not None:
            failure = self._fetch(failure[0], gets, found, *args, **kwargs)
            if failure is not None:
                raise failure[1]
        return found

    def _fetch(
        self, keys: list[str], gets: bool, found: dict[str, Any], *args: Any, **kwargs: Any
    ) -> tuple[list[str], BaseException] | None:
        """Read ``keys`` into ``found``, one call per server; None, or the keys whose
        server failed (it has left the ring: they have new homes) and its error."""
        batches: dict[str, tuple[Any, int, list[str]]] = {}
        for key in keys:
            server, pool, generation = self._route(key)
            batches.setdefault(server, (pool, generation, []))[2].append(key)
        failed: list[str] = []
        error: BaseException | None = None
        for server, (pool, generation, batch) in batches.items():
            try:
                part = (pool.gets_many if gets else pool.get_many)(batch, *args, **kwargs)
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                self._members.failed(server, generation, exc)
                failed += batch
                error = exc
                continue
            if gets:
                part = {k: (v, CasToken(server, generation, t)) for k, (v, t) in part.items()}
            found.update(part)
        return None if error is None else (failed, error)

    def gets_many(self, keys: Iterable[str], *args: Any, **kwargs: Any) -> Any:
        return self.get_many(keys, True, *args, **kwargs)

    def set_many(self, values: Mapping[str, Any], *args: Any, **kwargs: Any) -> list[str]:
        return [key for key, value in values.items() if not self.set(key, value, *args, **kwargs)]

    def delete_many(self, keys: Iterable[str], *args: Any, **kwargs: Any) -> bool:
        for key in keys:
            self.delete(key, *args, **kwargs)
        return True

    # HashClient binds these aliases to its own methods, not to our overrides.
    get_multi = get_many
    gets_multi = gets_many
    set_multi = set_many
    delete_multi = delete_many
