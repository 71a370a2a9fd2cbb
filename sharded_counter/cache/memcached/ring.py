"""The cluster's picture of its servers: who is in the ring, in which life, what a
failed call says about the server, and where a call may go (see ``cluster.py``).

The routing rules below are the blocking ``ClusterClient``'s and the asyncio
shell's (``aio/routing.py``) alike: both ask them, so the two cannot disagree on
which server a key lives on, when a call may be made again elsewhere, or which
cas token is stale.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pymemcache.client.rendezvous import RendezvousHash
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError

from ...errors import CacheUnavailable

#: Counter records and delayed_incr stashes, as ``keys.cache_keys`` names them.
RECORD_KEY = re.compile(r"[!-~]+:t:[0-9a-f]{40}")
STASH_KEY = re.compile(r"[!-~]+:delayed_incr:[0-9a-f]{40}")


class ServerUnavailable(CacheUnavailable, MemcacheError):  # type: ignore[misc]  # untyped base
    """The key's server is down, leaving or rejoining: the call was not sent anywhere.

    A ``CacheUnavailable`` (never applied: ``maybe_applied`` is false), and a
    pymemcache ``MemcacheError`` too, as ``HashClient``'s machinery expects of what
    a client raises.
    """


class ServerState(enum.Enum):
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
class View:
    """One consistent picture of the cluster; replaced whole, so readers need no lock."""

    states: Mapping[str, ServerState]
    generations: Mapping[str, int]  # bumped each time a server leaves or rejoins
    ring: Any  # RendezvousHash over every server that is not DOWN

    @classmethod
    def all_up(cls, servers: Iterable[str]) -> View:
        names = list(servers)
        return cls(
            states=dict.fromkeys(names, ServerState.UP),
            generations=dict.fromkeys(names, 0),
            ring=RendezvousHash(nodes=names),
        )

    def home(self, key: str) -> str | None:
        node: str | None = self.ring.get_node(key)
        return node

    def changed(self, changes: Mapping[str, ServerState], bump: Iterable[str]) -> View:
        """This picture with ``changes`` made, and the servers in ``bump`` in a new life."""
        states = {**self.states, **changes}
        generations = dict(self.generations)
        for server in bump:
            generations[server] += 1
        ring = RendezvousHash(nodes=[s for s, st in states.items() if st is not ServerState.DOWN])
        return View(states=states, generations=generations, ring=ring)

    def servers_in(self, state: ServerState) -> list[str]:
        return [s for s, st in self.states.items() if st is state]


def connection_lost(exc: BaseException) -> bool:
    """Did this call fail because the server is unreachable (as opposed to a bad request)?"""
    return isinstance(exc, (OSError, MemcacheUnexpectedCloseError))


def never_applied(exc: BaseException) -> bool:
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


# -- where a call may go: the rules both shells route by ------------------------------


def route(view: View, key: str) -> tuple[str, int]:
    """The server ``key`` goes to now, and that server's life; ``ServerUnavailable``
    if every server is down, or the key's server is leaving or rejoining."""
    home = view.home(key)
    if home is None:
        raise ServerUnavailable("every memcached server is down")
    if view.states[home] is not ServerState.UP:
        raise ServerUnavailable(f"memcached {home} is {view.states[home].value}")
    return home, view.generations[home]


def check_stash_delete(view: View, every_server: Any, key: str) -> None:
    """Refuse to delete a stash whose own server (in ``every_server``, the ring of all
    configured servers) is away: the stash there would outlive the delete and come
    back with it."""
    home = every_server.get_node(key)
    if STASH_KEY.fullmatch(key) and view.states[home] is not ServerState.UP:
        raise ServerUnavailable(
            f"not deleting {key}: its server {home} is away and would bring it back"
        )


def may_fail_over(cmd: str, key: str, *, unapplied: bool) -> bool:
    """May ``cmd`` on ``key``, failed by a server that just left, be made once more at
    the key's new home? Reads may. ``cas`` never: its token belongs to the server that
    issued it. Nor a stash's delete: see ``check_stash_delete``. Other writes only
    when the failure shows the first server never applied them (``unapplied``)."""
    if cmd in _READS:
        return True
    if cmd == "cas" or (cmd == "delete" and STASH_KEY.fullmatch(key)):
        return False
    return unapplied


_READS = frozenset({"get", "gets", "get_many", "gets_many"})


def token_is_current(token: CasToken, server: str, generation: int) -> bool:
    """Was ``token`` issued by ``server`` in this life? A ``cas`` with any other answers
    "not stored" without being sent."""
    return (token.server, token.generation) == (server, generation)
