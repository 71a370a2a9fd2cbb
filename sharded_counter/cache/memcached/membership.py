"""Servers leaving the cluster's ring and rejoining it, each cleaned on the way (see the
rules in ``cluster.py``).

A server whose call loses its connection leaves at once: the counter records
that the survivors hold for its keys are purged before they take those keys. A
server that answers again after ``dead_timeout`` is cleaned (its records
purged, the stashes its keys gathered on the stand-ins moved home) before it
serves again.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ...core.stash import Stash
from ..cas import Contended, change_stash
from .keydump import DumpFailed, command, dump_keys
from .ring import RECORD_KEY, STASH_KEY, ServerState, View, connection_lost

log = logging.getLogger("sharded_counter")

_MOVE_ATTEMPTS = 64


class Membership:
    """Which servers serve, and every move between states; one move at a time.

    ``addresses`` maps each server's name (``host:port``) to its address. ``pools``
    is the client's own dict of pools by name: a rejoining server gets a fresh pool
    there, made by ``new_pool``.
    """

    def __init__(
        self,
        addresses: Mapping[str, tuple[str, int]],
        pools: dict[str, Any],
        *,
        new_pool: Callable[[str], Any],
        connect_timeout: float,
        timeout: float,
        dead_timeout: float,
        drain: float,
    ) -> None:
        self._addresses = addresses
        self._pools = pools
        self._new_pool = new_pool
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._dead_timeout = dead_timeout
        self._drain = drain
        self._retry_at: dict[str, float] = {}  # servers out of the ring -> when to probe them
        self._next_retry = float("inf")  # min of _retry_at: one float is safe to read unlocked
        self._state_lock = threading.Lock()  # guards publishing a new view
        self._transition = threading.Lock()  # one leave or rejoin at a time
        self.view = View.all_up(addresses)

    # -- a server leaves --------------------------------------------------------------

    def failed(self, server: str, generation: int, exc: BaseException) -> None:
        """A call to ``server`` lost its connection: take the server out before anyone retries."""
        with self._transition:
            view = self.view
            if view.states[server] is not ServerState.UP or view.generations[server] != generation:
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
        self._publish(dict.fromkeys(servers, ServerState.LEAVING), bump=servers)
        # A work list rather than a retry: each survivor that fails while being purged
        # joins it, and the list ends because the survivors do.
        pending, leaving, unfinished = list(servers), list(servers), False
        while pending:
            gone = pending.pop()
            ring = self.view.ring  # still includes every LEAVING server
            for survivor in self.view.servers_in(ServerState.UP):
                try:
                    self._purge(survivor, functools.partial(_record_of, ring, gone))
                except DumpFailed as exc:
                    log.error("cannot clean memcached %s for %s's keys: %s", survivor, gone, exc)
                    unfinished = True
                except Exception as exc:
                    if not connection_lost(exc):
                        raise
                    log.warning("memcached %s failed too while being cleaned: %s", survivor, exc)
                    self._publish({survivor: ServerState.LEAVING}, bump=[survivor])
                    pending.append(survivor)
                    leaving.append(survivor)
        self._retry_later(leaving)
        if not unfinished:
            self._publish(dict.fromkeys(leaving, ServerState.DOWN))

    # -- a server comes back ----------------------------------------------------------

    def maybe_rejoin(self) -> None:
        """Probe the servers that are due, on a thread of its own (not the caller's time)."""
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
                elif self.view.states[server] is ServerState.LEAVING:
                    self._leave([server])  # still unreachable: finish the purge it left undone
                else:
                    self._retry_later([server])
        except Exception:
            log.exception("rejoining memcached servers failed; trying again later")
        finally:
            self._transition.release()

    def _retry_later(self, servers: Iterable[str]) -> None:
        again = time.monotonic() + self._dead_timeout
        for server in servers:
            self._retry_at[server] = again
        self._next_retry = min(self._retry_at.values(), default=float("inf"))

    def _answers(self, server: str) -> bool:
        try:
            reply = command(self._addresses[server], b"version\r\n", self._connect_timeout)
        except OSError:
            return False
        return reply.startswith(b"VERSION")

    def _rejoin(self, server: str) -> None:
        """Clean ``server`` and put it back in the ring (``_transition`` held)."""
        self._pools[server] = self._new_pool(server)  # no socket from its earlier life
        self._publish({server: ServerState.JOINING}, bump=[server])
        # Calls already routed around it land on the stand-ins before their stashes move.
        time.sleep(self._drain)
        try:
            purged = self._purge(server, lambda key: RECORD_KEY.fullmatch(key) is not None)
        except Exception as exc:
            return self._abort_rejoin(server, exc)
        moved = 0
        ring = self.view.ring
        for stand_in in self.view.servers_in(ServerState.UP):
            try:
                moved += self._send_home(stand_in, server, ring)
            except _HomeFailed as failure:
                return self._abort_rejoin(server, failure.__cause__ or failure)
            except DumpFailed as exc:
                return self._abort_rejoin(server, exc)
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                log.warning("memcached %s failed during a rejoin: %s", stand_in, exc)
                self._leave([stand_in])
        self._retry_at.pop(server, None)
        self._next_retry = min(self._retry_at.values(), default=float("inf"))
        self._publish({server: ServerState.UP})
        log.warning(
            "memcached %s is back: deleted %d counter records it held, moved %d stashes home",
            server,
            purged,
            moved,
        )
        return None

    def _abort_rejoin(self, server: str, exc: BaseException) -> None:
        if isinstance(exc, DumpFailed):
            log.error("memcached %s stays out for now: %s", server, exc)
        else:
            log.warning("memcached %s failed again while rejoining: %s", server, exc)
        # Its keys failed fast meanwhile, so writes may have missed the stand-ins'
        # records: leaving purges them, as for any departure.
        self._leave([server])

    def _send_home(self, stand_in: str, home: str, ring: Any) -> int:
        """Move ``stand_in``'s stashes for keys owned by ``home`` into it; drop its records."""
        keys = dump_keys(self._addresses[stand_in], self._timeout)
        source, target = self._pools[stand_in], self._pools[home]
        moved = 0
        for key in keys:
            if ring.get_node(key) != home:
                continue
            if RECORD_KEY.fullmatch(key):
                source.delete(key, noreply=False)  # out of use now; stale if this key moves back
            elif STASH_KEY.fullmatch(key):
                amount = _take_movable(source, key)
                if amount.owed or amount.unsure:
                    try:
                        _add(target, key, amount)
                    except Exception as exc:
                        _put_back(source, key, amount)
                        raise _HomeFailed(home) from exc
                    moved += 1
        return moved

    # -- helpers ------------------------------------------------------------------------

    def _publish(self, changes: Mapping[str, ServerState], *, bump: Iterable[str] = ()) -> None:
        with self._state_lock:
            self.view = self.view.changed(changes, bump)

    def _purge(self, server: str, doomed: Callable[[str], bool]) -> int:
        """Delete the keys on ``server`` that ``doomed`` picks; return how many."""
        pool = self._pools[server]
        count = 0
        for key in dump_keys(self._addresses[server], self._timeout):
            if doomed(key):
                pool.delete(key, noreply=False)
                count += 1
        return count


def _record_of(ring: Any, server: str, key: str) -> bool:
    """Is ``key`` a counter record that ``ring`` sends to ``server``?"""
    return RECORD_KEY.fullmatch(key) is not None and ring.get_node(key) == server


class _HomeFailed(Exception):
    """The returning server failed while a stash was being moved into it."""


# -- moving a stash between servers: each step a cas.change_stash on one server's pool -------


def _take_movable(pool: Any, key: str) -> Stash:
    """Take what of a stash may move (see ``Stash.movable``); fold markers and claimed
    unsure writes stay. An empty Stash if there is nothing, or it kept changing."""

    def take(stash: Stash) -> Stash | None:
        moving = stash.movable()
        return stash.without(moving) if moving.pending or moving.unsure else None

    try:
        before = change_stash(pool, key, take, attempts=_MOVE_ATTEMPTS)
    except Contended:  # it stays on the stand-in, out of view once the home serves
        return Stash()
    return before.movable()


def _add(pool: Any, key: str, moved: Stash) -> None:
    """Add ``moved`` to a stash on one server (no expiry), as ``CacheTier.stash`` does."""
    change_stash(pool, key, lambda s: s.absorbed(moved), attempts=_MOVE_ATTEMPTS)


def _put_back(pool: Any, key: str, moved: Stash) -> None:
    try:
        _add(pool, key, moved)
    except Exception as exc:
        log.error("stash %s lost %d while being moved between servers: %s", key, moved.owed, exc)
