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
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

from pymemcache.client.base import PooledClient, check_key_helper
from pymemcache.client.hash import HashClient
from pymemcache.client.rendezvous import RendezvousHash
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError

from ..core.stash import Stash

log = logging.getLogger("sharded_counter")

#: Counter records and delayed_incr stashes, as ``keys.cache_keys`` names them.
RECORD_KEY = re.compile(r"[!-~]+:t:[0-9a-f]{40}")
STASH_KEY = re.compile(r"[!-~]+:delayed_incr:[0-9a-f]{40}")

_READS = frozenset({"get", "gets"})
_MOVE_ATTEMPTS = 64
_DUMP_BUSY_WAIT = 10.0  # seconds to wait out another crawl


class ServerUnavailable(MemcacheError):  # type: ignore[misc]  # pymemcache is untyped
    """The key's server is down, leaving or rejoining: nothing was sent."""


class _State(enum.Enum):
    UP = "up"
    LEAVING = "leaving"  # out of service: its keys fail fast until the others are purged
    DOWN = "down"  # out of the ring: its keys live on the others
    JOINING = "joining"  # being cleaned before it serves again: its keys fail fast


@dataclasses.dataclass(frozen=True)
class CasToken:
    """A ``gets`` token together with the server (and that server's life) that issued it.

    memcached's cas values are per-server counters. If the key moves to another
    server, or its server restarts, the same number can name an unrelated version.
    The key could then be overwritten from a stale read. Such a ``cas`` answers
    ``False`` (not stored) without being sent.
    """

    server: str
    generation: int
    value: Any


@dataclasses.dataclass(frozen=True)
class _View:
    """One consistent picture of the cluster; replaced whole, so readers need no lock."""

    states: Mapping[str, _State]
    generations: Mapping[str, int]
    ring: Any  # RendezvousHash over every server that is not DOWN

    def home(self, key: str) -> str | None:
        node: str | None = self.ring.get_node(key)
        return node


def _connection_lost(exc: BaseException) -> bool:
    """Did this call fail because the server is unreachable (as opposed to a bad request)?"""
    return isinstance(exc, (OSError, MemcacheUnexpectedCloseError))


def _never_applied(exc: BaseException) -> bool:
    """Does the failure show the request was not applied (or died with the server)?

    Refused: never sent. Closed or reset under us: the server process is gone,
    and took what it had applied with it, or it dropped the connection unread.
    A timeout says nothing: a paused server applies the request when it resumes.
    """
    return isinstance(
        exc,
        (
            ConnectionRefusedError,
            ConnectionResetError,
            ConnectionAbortedError,
            BrokenPipeError,
            MemcacheUnexpectedCloseError,
        ),
    )


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
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._drain = timeout if drain is None else drain
        # Named as HashClient names its pools ("host:port"), so self.clients[name] works.
        self._addresses = {f"{host}:{port}": (host, port) for host, port in servers}
        self._all = RendezvousHash(nodes=list(self._addresses))
        self._retry_at: dict[str, float] = {}  # servers out of the ring -> when to probe them
        self._next_retry = float("inf")  # min of _retry_at: one float is safe to read unlocked
        self._state_lock = threading.Lock()  # guards publishing a new _View
        self._transition = threading.Lock()  # one leave or rejoin at a time
        self._view = _View(
            states=dict.fromkeys(self._addresses, _State.UP),
            generations=dict.fromkeys(self._addresses, 0),
            ring=RendezvousHash(nodes=list(self._addresses)),
        )

    # -- looking at the cluster ----------------------------------------------------

    @property
    def servers(self) -> tuple[str, ...]:
        """Every configured server, ``host:port``."""
        return tuple(self._addresses)

    def server_states(self) -> dict[str, str]:
        """Each server's state: "up", "leaving", "down" or "joining"."""
        return {name: state.value for name, state in self._view.states.items()}

    def server_for(self, key: str) -> str | None:
        """The server ``key`` goes to now (None when every server is down)."""
        return self._view.home(key)

    # -- routing ---------------------------------------------------------------------

    def _route(self, key: str) -> tuple[str, Any, int]:
        check_key_helper(key, self.allow_unicode_keys, self.key_prefix)
        self._maybe_rejoin()
        view = self._view
        home = view.home(key)
        if home is None:
            raise ServerUnavailable("every memcached server is down")
        if view.states[home] is not _State.UP:
            raise ServerUnavailable(f"memcached {home} is {view.states[home].value}")
        return home, self.clients[home], view.generations[home]

    def _check_stash_delete(self, key: str) -> None:
        home = self._all.get_node(key)
        if STASH_KEY.fullmatch(key) and self._view.states[home] is not _State.UP:
            raise ServerUnavailable(
                f"not deleting {key}: its server {home} is away and would bring it back"
            )

    def _get_client(self, key: str) -> Any:
        # What HashClient's own helpers call; everything we use goes through _route.
        return self._route(key)[1]

    def _safely_run_func(
        self, client: Any, func: Callable[..., Any], default_val: Any, *args: Any, **kwargs: Any
    ) -> Any:
        # HashClient runs close/flush_all/quit through here. No silent defaults.
        return func(*args, **kwargs)

    # -- commands ------------------------------------------------------------------

    def _run_cmd(self, cmd: str, key: str, default_val: Any, *args: Any, **kwargs: Any) -> Any:
        if cmd == "delete":
            self._check_stash_delete(key)
        for attempt in (1, 2):
            server, pool, generation = self._route(key)
            try:
                result = getattr(pool, cmd)(key, *args, **kwargs)
            except Exception as exc:
                if not _connection_lost(exc):
                    raise
                self._failed(server, generation, exc)
                if attempt == 1 and self._may_retry(cmd, key, exc):
                    continue
                raise
            if cmd == "gets":
                value, token = result
                return (value, None if value is None else CasToken(server, generation, token))
            return result
        raise AssertionError("unreachable")

    @staticmethod
    def _may_retry(cmd: str, key: str, exc: BaseException) -> bool:
        if cmd in _READS:
            return True
        if cmd == "delete" and STASH_KEY.fullmatch(key):
            return False  # its home just went away: see _check_stash_delete
        return _never_applied(exc)

    def cas(
        self, key: str, value: Any, cas: Any, expire: int = 0, noreply: bool | None = None
    ) -> Any:
        server, pool, generation = self._route(key)
        if isinstance(cas, CasToken):
            if (cas.server, cas.generation) != (server, generation):
                return False  # read from another server, or an earlier life of this one
            cas = cas.value
        try:
            return pool.cas(key, value, cas, expire, noreply)
        except Exception as exc:
            if not _connection_lost(exc):
                raise
            self._failed(server, generation, exc)
            if _never_applied(exc):
                return False
            raise

    def get_many(self, keys: Iterable[str], gets: bool = False, *args: Any, **kwargs: Any) -> Any:
        found: dict[str, Any] = {}
        pending = list(keys)
        for attempt in (1, 2):
            batches: dict[str, tuple[Any, int, list[str]]] = {}
            for key in pending:
                server, pool, generation = self._route(key)
                batches.setdefault(server, (pool, generation, []))[2].append(key)
            failed: list[str] = []
            error: BaseException | None = None
            for server, (pool, generation, batch) in batches.items():
                try:
                    part = (pool.gets_many if gets else pool.get_many)(batch, *args, **kwargs)
                except Exception as exc:
                    if not _connection_lost(exc):
                        raise
                    self._failed(server, generation, exc)
                    failed += batch
                    error = exc
                    continue
                if gets:
                    part = {k: (v, CasToken(server, generation, t)) for k, (v, t) in part.items()}
                found.update(part)
            if not failed:
                return found
            if attempt == 2 and error is not None:
                raise error
            pending = failed  # their server has left: ask their new homes
        return found

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

    # -- a server leaves --------------------------------------------------------------

    def _failed(self, server: str, generation: int, exc: BaseException) -> None:
        """A call to ``server`` lost its connection: take the server out before anyone retries."""
        with self._transition:
            view = self._view
            if view.states[server] is not _State.UP or view.generations[server] != generation:
                return  # already handled, or an error from a connection of an earlier life
            log.warning(
                "memcached %s failed (%s: %s); its keys move to the other servers",
                server,
                type(exc).__name__,
                exc,
            )
            self._leave([server])

    def _leave(self, servers: list[str]) -> None:
        """Take ``servers`` out; purge what the survivors hold of their counter records.

        Called with ``_transition`` held. A survivor that loses its connection
        while being purged leaves too. If a survivor cannot list its keys (its
        crawler stays busy), the leavers stay LEAVING: their keys keep failing
        fast, which is safe, and the purge is tried again after ``dead_timeout``.
        """
        self._publish(dict.fromkeys(servers, _State.LEAVING), bump=servers)
        pending, leaving, unfinished = list(servers), list(servers), False
        while pending:
            gone = pending.pop()
            ring = self._view.ring  # still includes every LEAVING server
            for survivor in self._servers_in(_State.UP):
                try:
                    self._purge(survivor, functools.partial(_record_of, ring, gone))
                except _DumpFailed as exc:
                    log.error("cannot clean memcached %s for %s's keys: %s", survivor, gone, exc)
                    unfinished = True
                except Exception as exc:
                    if not _connection_lost(exc):
                        raise
                    log.warning("memcached %s failed too while being cleaned: %s", survivor, exc)
                    self._publish({survivor: _State.LEAVING}, bump=[survivor])
                    pending.append(survivor)
                    leaving.append(survivor)
        self._retry_later(leaving)
        if not unfinished:
            self._publish(dict.fromkeys(leaving, _State.DOWN))

    # -- a server comes back ----------------------------------------------------------

    def _maybe_rejoin(self) -> None:
        if time.monotonic() < self._next_retry:
            return
        if not self._transition.acquire(blocking=False):
            return  # someone is leaving or rejoining a server already
        # Probing a paused server takes a timeout: not on the caller's time.
        thread = threading.Thread(target=self._rejoin_due, name="memcache-rejoin", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._transition.release()
            raise

    def _rejoin_due(self) -> None:
        try:
            now = time.monotonic()
            for server in [s for s, at in self._retry_at.items() if at <= now]:
                if self._answers(server):
                    self._rejoin(server)
                elif self._view.states[server] is _State.LEAVING:
                    self._leave([server])  # still unreachable: finish the purge it left undone
                else:
                    self._retry_later([server])
        except Exception:
            log.exception("rejoining memcached servers failed; trying again later")
        finally:
            self._transition.release()

    def _retry_later(self, servers: Iterable[str]) -> None:
        again = time.monotonic() + self.dead_timeout
        for server in servers:
            self._retry_at[server] = again
        self._next_retry = min(self._retry_at.values(), default=float("inf"))

    def _answers(self, server: str) -> bool:
        try:
            reply = _command(self._addresses[server], b"version\r\n", self._connect_timeout)
        except OSError:
            return False
        return reply.startswith(b"VERSION")

    def _rejoin(self, server: str) -> None:
        """Clean ``server`` and put it back in the ring (``_transition`` held)."""
        self.clients[server] = self._fresh_pool(server)  # no socket from its earlier life
        self._publish({server: _State.JOINING}, bump=[server])
        # Calls already routed around it land on the stand-ins before their stashes move.
        time.sleep(self._drain)
        try:
            purged = self._purge(server, lambda key: RECORD_KEY.fullmatch(key) is not None)
        except Exception as exc:
            return self._abort_rejoin(server, exc)
        moved = 0
        ring = self._view.ring
        for stand_in in self._servers_in(_State.UP):
            try:
                moved += self._send_home(stand_in, server, ring)
            except _HomeFailed as failure:
                return self._abort_rejoin(server, failure.__cause__ or failure)
            except _DumpFailed as exc:
                return self._abort_rejoin(server, exc)
            except Exception as exc:
                if not _connection_lost(exc):
                    raise
                log.warning("memcached %s failed during a rejoin: %s", stand_in, exc)
                self._leave([stand_in])
        self._retry_at.pop(server, None)
        self._next_retry = min(self._retry_at.values(), default=float("inf"))
        self._publish({server: _State.UP})
        log.warning(
            "memcached %s is back: deleted %d counter records it held, moved %d stashes home",
            server,
            purged,
            moved,
        )
        return None

    def _abort_rejoin(self, server: str, exc: BaseException) -> None:
        if isinstance(exc, _DumpFailed):
            log.error("memcached %s stays out for now: %s", server, exc)
        else:
            log.warning("memcached %s failed again while rejoining: %s", server, exc)
        # Its keys failed fast meanwhile, so writes may have missed the stand-ins'
        # records: leaving purges them, as for any departure.
        self._leave([server])

    def _send_home(self, stand_in: str, home: str, ring: Any) -> int:
        """Move ``stand_in``'s stashes for keys owned by ``home`` into it; drop its records."""
        keys = _dump_keys(self._addresses[stand_in], self._timeout)
        source, target = self.clients[stand_in], self.clients[home]
        moved = 0
        for key in keys:
            if ring.get_node(key) != home:
                continue
            if RECORD_KEY.fullmatch(key):
                source.delete(key, noreply=False)  # out of use now; stale if this key moves back
            elif STASH_KEY.fullmatch(key):
                amount = _take(source, key)
                if amount.owed or amount.unsure:
                    try:
                        _add_signed(target, key, amount)
                    except Exception as exc:
                        _put_back(source, key, amount)
                        raise _HomeFailed(home) from exc
                    moved += 1
        return moved

    # -- helpers ------------------------------------------------------------------------

    def _servers_in(self, state: _State) -> list[str]:
        return [s for s, st in self._view.states.items() if st is state]

    def _publish(self, changes: Mapping[str, _State], *, bump: Iterable[str] = ()) -> None:
        with self._state_lock:
            states = {**self._view.states, **changes}
            generations = dict(self._view.generations)
            for server in bump:
                generations[server] += 1
            ring = RendezvousHash(nodes=[s for s, st in states.items() if st is not _State.DOWN])
            self._view = _View(states=states, generations=generations, ring=ring)

    def _fresh_pool(self, server: str) -> Any:
        pool = PooledClient(self._addresses[server], **self.default_kwargs)
        pool.client_class = self.client_class
        return pool

    def _purge(self, server: str, doomed: Callable[[str], bool]) -> int:
        """Delete the keys on ``server`` that ``doomed`` picks; return how many."""
        pool = self.clients[server]
        count = 0
        for key in _dump_keys(self._addresses[server], self._timeout):
            if doomed(key):
                pool.delete(key, noreply=False)
                count += 1
        return count


def _record_of(ring: Any, server: str, key: str) -> bool:
    """Is ``key`` a counter record that ``ring`` sends to ``server``?"""
    return RECORD_KEY.fullmatch(key) is not None and ring.get_node(key) == server


class _DumpFailed(Exception):
    """A server could not list its keys."""


class _HomeFailed(Exception):
    """The returning server failed while a stash was being moved into it."""


def _command(address: tuple[str, int], command: bytes, timeout: float) -> bytes:
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(command)
        return sock.recv(4096)


def _dump_keys(address: tuple[str, int], timeout: float) -> list[str]:
    """Every key a server holds, from ``lru_crawler metadump all`` (keys come URL-encoded).

    memcached runs one crawl at a time and answers BUSY meanwhile (perhaps to
    another process cleaning the same server), so BUSY is waited out for a while.
    """
    deadline = time.monotonic() + _DUMP_BUSY_WAIT
    wait = 0.01
    while True:
        reply = _read_dump(address, timeout)
        if not reply.startswith(b"BUSY"):
            break
        if time.monotonic() + wait > deadline:
            raise _DumpFailed(f"memcached at {address} stayed busy crawling; cannot list its keys")
        time.sleep(wait)
        wait = min(wait * 2, 0.5)
    if not reply.endswith(b"END\r\n"):
        raise _DumpFailed(f"memcached at {address} cannot list its keys: {reply[:80]!r}")
    # Item lines end in a bare "\n"; only the closing END has "\r\n".
    return [
        unquote(line[4:].split(b" ", 1)[0].decode("ascii"))
        for line in reply.splitlines()
        if line.startswith(b"key=")
    ]


def _read_dump(address: tuple[str, int], timeout: float) -> bytes:
    data = bytearray()
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.settimeout(max(timeout, 2.0))  # a big cache takes a while to walk
        sock.sendall(b"lru_crawler metadump all\r\n")
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise _DumpFailed(f"memcached at {address} closed the connection mid-dump")
            data += chunk
            if data.endswith(b"END\r\n"):
                return bytes(data)
            if not data.startswith(b"key=") and b"\n" in data:
                return bytes(data)  # a one-line answer: BUSY, ERROR, CLIENT_ERROR


def _take(pool: Any, key: str) -> Stash:
    """Take what of a stash may move (see ``Stash.movable``) with ``cas``; fold markers
    and claimed unsure writes stay. An empty Stash if there is nothing."""
    for _ in range(_MOVE_ATTEMPTS):
        raw, token = pool.gets(key)
        stash = Stash.decode(raw).live()
        moving = stash.movable()
        if not (moving.pending or moving.unsure):
            return Stash()
        if pool.cas(key, stash.without(moving).encode(), token, 0, noreply=False) is True:
            return moving
    return Stash()


def _add_signed(pool: Any, key: str, moved: Stash) -> None:
    """Add ``moved`` to a stash on one server (no expiry), as ``CacheTier.stash`` does."""
    for _ in range(_MOVE_ATTEMPTS):
        raw, token = pool.gets(key)
        if raw is None:
            if pool.add(key, moved.encode(), 0, noreply=False) is True:
                return
        elif pool.cas(key, Stash.decode(raw).live().absorbed(moved).encode(), token, 0) is True:
            return
    raise MemcacheError(f"could not add to {key} after {_MOVE_ATTEMPTS} attempts")


def _put_back(pool: Any, key: str, moved: Stash) -> None:
    try:
        _add_signed(pool, key, moved)
    except Exception as exc:
        log.error("stash %s lost %d while being moved between servers: %s", key, moved.owed, exc)
