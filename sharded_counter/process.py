"""What this process owns, and the two moments it is given up: a fork, and ``reconnect()``.

Sockets, gRPC channels, pools, group commits, shard pickers and leases belong
to one process. A forked child that used its parent's would read the replies
meant for the parent (and the parent the child's), so a call reported as
failed could have landed, and a retry would count it twice. Every object of
ours therefore reaches them through this module:

* ``PerProcess(make)`` holds a value made on first use in each process, and
  again after ``reconnect()``. A ``Counter`` holds its connections and paths
  this way, so making one opens nothing, and one made before a fork (at import
  time, under gunicorn ``--preload``) connects afresh in each child on its
  first call.
* ``forget_at_fork(fn)`` names state a child must start without: what the
  parent's threads were doing (locks they held, groups they led, amounts a
  buffer held for the parent to write). It runs in the child only.
* ``forget_connections(fn)`` names process-wide registries of connections
  (clients, backends): emptied in a forked child, and by ``reconnect()``.

One generation number says which process (or reconnection) a value was made
in: a fork or a reconnect bumps it, and ``PerProcess`` compares it on every
call, which costs one attribute read and one comparison.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigurationError

_T = TypeVar("_T")

_generation = 0
# Held while a PerProcess value is made: makes are rare (once per object per process),
# and one may make another (a buffer's counter), hence reentrant. New in a forked child.
_making = threading.RLock()
_connection_registries: list[Callable[[], None]] = []
_fork_hooks: list[Callable[[], None]] = []


def generation() -> int:
    """Bumped in a forked child and by ``reconnect()``: a value made under another
    generation is not this process's (or this connection's) to use."""
    return _generation


def forget_connections(forget: Callable[[], None]) -> Callable[[], None]:
    """Run ``forget`` (which empties a registry of connections) in a forked child and on
    ``reconnect()``. Returns it, so it can decorate the function that does it."""
    _connection_registries.append(forget)
    return forget


def forget_at_fork(forget: Callable[[], None]) -> Callable[[], None]:
    """Run ``forget`` in a forked child only, after the connections are forgotten."""
    _fork_hooks.append(forget)
    return forget


def reconnect() -> None:
    """Make every counter, buffer and helper of this process connect afresh on its next
    call, reading the environment and the settings as they are then.

    For tests that point the process at other backends (the pytest plugin's
    ``sharded_counter_env`` calls it), and for an app whose backends moved.
    Calls already running finish on the connections they had. No increment is
    dropped (a ``CounterBuffer`` keeps what it holds), but what failed memcache calls
    left to do (cache/backlog.py) is forgotten, as at a restart: a cached total
    marked suspect may stay stale until its TTL.
    """
    _new_generation()


def _new_generation() -> None:
    global _generation
    _generation += 1
    for forget in _connection_registries:
        forget()


def _after_fork_in_child() -> None:
    global _making
    _making = threading.RLock()  # a parent's thread may have held it: it never returns here
    _new_generation()
    for forget in _fork_hooks:
        forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


def check_given_here(given_in: int, what: str) -> None:
    """Refuse to use clients a caller passed in (``what``) in another process than the
    one they were passed in (``given_in``, its pid).

    Ours are made anew in a forked child; a caller's cannot be, and a child that
    used its parent's socket or channel would read the parent's replies. So the
    first call in a child raises ``ConfigurationError`` saying what to do, rather
    than count over a shared connection.
    """
    if os.getpid() != given_in:
        raise ConfigurationError(
            f"{what} passed in process {given_in} cannot be used in process {os.getpid()} "
            "(a forked child): its connections are its parent's. Make the object in the "
            "child, or let it make its own clients"
        )


class PerProcess(Generic[_T]):
    """A value made by ``make()`` on first use in each process (and after ``reconnect()``).

    Threads asking at once share one ``make()``. A ``make()`` that raises leaves
    nothing behind: the next call tries again.
    """

    __slots__ = ("_generation", "_make", "_value")

    def __init__(self, make: Callable[[], _T]) -> None:
        self._make = make
        self._generation = -1
        self._value: _T | None = None

    def get(self) -> _T:
        if self._generation == _generation:
            return self._value  # type: ignore[return-value]  # made in this generation
        return self._made_now()

    def _made_now(self) -> _T:
        with _making:
            current = _generation
            if self._generation != current:
                self._value = self._make()
                self._generation = current
            return self._value  # type: ignore[return-value]

    def made(self) -> bool:
        """Was the value made in this process (and generation)? Makes nothing."""
        return self._generation == _generation
