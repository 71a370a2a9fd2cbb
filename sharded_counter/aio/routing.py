"""Which memcached server an asyncio call goes to, and what a failed server means.

``memcache.py`` turns errors into ``CacheUnavailable`` and keeps the outage log;
the routers here pick the ``emcache`` client for each call and decide what a
failure does to the servers:

* ``OneServer``: one configured server. After a failure its calls fail at once,
  unsent, for ``REST_AFTER_FAILURE`` seconds: emcache would otherwise make each
  one wait out its timeout while it reconnects in the background.
* ``ServerRing``: several servers, with the blocking cluster's failover
  (cache/memcached/cluster.py). The routing rules are ring.py's, which ``ClusterClient``
  asks too. A server that fails a call leaves the ring, and is cleaned before it
  serves again, by the blocking cluster's own ``Membership`` (cache/memcached/membership.py):
  the same purges and the same moves of stashes home, in the same order. Those
  moves are rare administration (a server leaving or coming back) made over
  blocking sockets, so they run on a worker thread; the call that saw the
  failure awaits the leave, as a blocking caller waits for it, and no call
  blocks the event loop.

emcache does not tell a call sent to a dead server from a slow one: both time
out (it keeps a lost connection's request waiting, and reconnects in the
background). So after a failure no write is made again at the new home, since
it may have landed (``ring.may_fail_over``); reads are. ``gets`` hands out
``CasToken``s naming the server and its life, and ``cas`` with a stale one
answers "not stored" unsent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import emcache
from pymemcache.client.base import PooledClient
from pymemcache.client.rendezvous import RendezvousHash

from ..cache.memcached import DEAD_TIMEOUT
from ..cache.memcached.membership import Membership
from ..cache.memcached.ring import (
    ServerUnavailable,
    View,
    check_stash_delete,
    may_fail_over,
    route,
)
from ..settings import Settings

T = TypeVar("T")

#: Seconds the only server, after failing a call, is not asked again: calls for its
#: keys fail at once meanwhile (as memcache being down), instead of each waiting out
#: the timeout.
REST_AFTER_FAILURE = 1.0

#: What a call's failure looks like when the server, not the request, is at fault.
#: (``asyncio.TimeoutError`` is an ``OSError`` from Python 3.11 on, not before.)
SERVER_FAILED = (OSError, asyncio.TimeoutError)

#: A call: sent with the server's client, its name and its life (to tag cas tokens).
Send = Callable[[emcache.Client, str, int], Awaitable[T]]
#: A read of many keys: the call for the keys that live on one server.
Group = Callable[[list[str]], Send[dict[str, Any]]]


class _Clients:
    """One emcache client per server and life: a server that rejoins the ring gets a
    fresh one, so no request of its earlier life is answered on its new one."""

    def __init__(self, addresses: dict[str, tuple[str, int]], settings: Settings) -> None:
        self._addresses = addresses
        self._settings = settings
        self._open: dict[str, tuple[int, emcache.Client]] = {}
        self._opening: dict[tuple[str, int], asyncio.Future[emcache.Client]] = {}

    async def get(self, server: str, generation: int) -> emcache.Client:
        found = self._open.get(server)
        if found is not None and found[0] == generation:
            return found[1]
        opening = self._opening.get((server, generation))
        if opening is None:
            host, port = self._addresses[server]
            s = self._settings
            opening = asyncio.ensure_future(
                emcache.create_client(
                    [emcache.MemcachedHostAddress(host, port)],
                    timeout=s.memcache_timeout,
                    connection_timeout=s.memcache_connect_timeout,
                    max_connections=64,
                    min_connections=1,
                )
            )
            self._opening[(server, generation)] = opening
        try:
            client = await asyncio.shield(opening)
        finally:
            if opening.done():
                self._opening.pop((server, generation), None)
        stale = self._open.get(server)
        if stale is None or stale[0] < generation:
            self._open[server] = (generation, client)
            if stale is not None:
                await stale[1].close()
        return client

    async def close(self) -> None:
        clients, self._open = [client for _, client in self._open.values()], {}
        for client in clients:
            await client.close()


class OneServer:
    """Routes every call to the one configured server (see the module docstring)."""

    def __init__(self, address: tuple[str, int], settings: Settings) -> None:
        self.name = f"{address[0]}:{address[1]}"
        self._clients = _Clients({self.name: address}, settings)
        self._rest_until = 0.0

    async def call(self, method: str, key: str, send: Send[T]) -> T:
        return await self._send(method, send)

    async def call_groups(self, keys: Sequence[str], send: Group) -> dict[str, Any]:
        return await self._send("get", send(list(keys)))

    async def _send(self, method: str, send: Send[T]) -> T:
        if time.monotonic() < self._rest_until:
            raise ServerUnavailable(f"memcache {method} not sent: {self.name} failed just now")
        try:
            client = await self._clients.get(self.name, 0)
            return await send(client, self.name, 0)
        except SERVER_FAILED:
            self._rest_until = time.monotonic() + REST_AFTER_FAILURE
            raise

    async def close(self) -> None:
        await self._clients.close()


class ServerRing:
    """Routes each call to its key's server, with the blocking cluster's failover
    (see the module docstring). ``dead_timeout`` is how long a failed server is left
    alone before it is probed; ``drain`` how long a rejoin waits for calls already on
    their way to the stand-ins before it moves stashes (default: the timeout)."""

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        settings: Settings,
        *,
        dead_timeout: float = DEAD_TIMEOUT,
        drain: float | None = None,
    ) -> None:
        self._addresses = {f"{host}:{port}": (host, port) for host, port in servers}
        self._every_server = RendezvousHash(nodes=list(self._addresses))
        self._clients = _Clients(self._addresses, settings)

        def blocking_pool(server: str) -> PooledClient:
            # For the membership's cleaning, on its worker thread only.
            return PooledClient(
                self._addresses[server],
                connect_timeout=settings.memcache_connect_timeout,
                timeout=settings.memcache_timeout,
                no_delay=True,
                default_noreply=False,
                max_pool_size=4,
            )

        self._members = Membership(
            self._addresses,
            {name: blocking_pool(name) for name in self._addresses},
            new_pool=blocking_pool,
            connect_timeout=settings.memcache_connect_timeout,
            timeout=settings.memcache_timeout,
            dead_timeout=dead_timeout,
            drain=settings.memcache_timeout if drain is None else drain,
        )

    # -- looking at the ring (as ClusterClient shows it) ------------------------------

    @property
    def view(self) -> View:
        return self._members.view

    def server_states(self) -> dict[str, str]:
        """Each server's state: "up", "leaving", "down" or "joining"."""
        return {name: state.value for name, state in self._members.view.states.items()}

    def server_for(self, key: str) -> str | None:
        """The server ``key`` goes to now (None when every server is down)."""
        return self._members.view.home(key)

    # -- calls ------------------------------------------------------------------------
    #
    # A call whose server fails is made once more, at the key's new home, when
    # ring.may_fail_over says so: the first server has left the ring by then, and
    # there is no third try.

    async def call(self, method: str, key: str, send: Send[T]) -> T:
        if method == "delete":
            check_stash_delete(self._members.view, self._every_server, key)
        try:
            return await self._at_home(key, send)
        except SERVER_FAILED:
            if not may_fail_over(method, key, unapplied=False):
                raise
        return await self._at_home(key, send)

    async def _at_home(self, key: str, send: Send[T]) -> T:
        self._members.maybe_rejoin()  # starts a thread of its own when a probe is due
        server, generation = route(self._members.view, key)
        try:
            client = await self._clients.get(server, generation)
            return await send(client, server, generation)
        except SERVER_FAILED as exc:
            await asyncio.to_thread(self._members.failed, server, generation, exc)
            raise

    async def call_groups(self, keys: Sequence[str], send: Group) -> dict[str, Any]:
        """Read ``keys``: ``send(keys on one server)`` for each server, side by side, their
        answers merged. The keys of a server that fails are read once more at their new
        homes (it has left the ring by then)."""
        found: dict[str, Any] = {}
        failure = await self._fetch(keys, send, found)
        if failure is not None:
            failure = await self._fetch(failure[0], send, found)
            if failure is not None:
                raise failure[1]
        return found

    async def _fetch(
        self, keys: Sequence[str], send: Group, found: dict[str, Any]
    ) -> tuple[list[str], BaseException] | None:
        self._members.maybe_rejoin()
        view = self._members.view
        groups: dict[tuple[str, int], list[str]] = {}
        for key in keys:
            groups.setdefault(route(view, key), []).append(key)

        async def on_server(server: str, generation: int, group: list[str]) -> dict[str, Any]:
            client = await self._clients.get(server, generation)
            return await send(group)(client, server, generation)

        answers = await asyncio.gather(
            *(on_server(s, g, group) for (s, g), group in groups.items()),
            return_exceptions=True,
        )
        failed: list[str] = []
        error: BaseException | None = None
        for ((server, generation), group), answer in zip(groups.items(), answers, strict=True):
            if isinstance(answer, SERVER_FAILED):
                await asyncio.to_thread(self._members.failed, server, generation, answer)
                failed += group
                error = answer
            elif isinstance(answer, BaseException):
                raise answer
            else:
                found.update(answer)
        return None if error is None else (failed, error)

    async def close(self) -> None:
        await self._clients.close()
