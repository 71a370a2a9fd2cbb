"""The one read-change-cas loop: change a memcache key safely under concurrent writers.

memcached has no transactions. A change that depends on the current value reads
it with ``gets`` (which hands out a cas token), computes the new value, and
stores it with ``cas``, which fails if anyone wrote the key since the read; a
missing key is created with ``add``, which fails if anyone created it meanwhile.
A failed store means another writer got there first, so the loop reads again:
at once after the first loss, then after a random pause that grows with each
loss. After ``attempts`` lost races it gives up with ``Contended``, which says
nothing was stored.

The cached record, the ``delayed_incr`` stash (the cache tier, and the cluster
moving stashes between servers) and the locks all change their keys through
this loop; only what a change computes differs. It is written once, as steps
(``changing``, core/effects.py) that any shell can drive; ``change_key`` drives
it in this thread on a client of the caller's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ..core.effects import Effect, Memcache, Sleep, Steps, drive
from ..core.stash import Stash
from ..errors import CacheUnavailable

T = TypeVar("T")

#: A value as ``gets`` read it, with its cas token; ``(None, None)`` when missing.
Seen = tuple[bytes | None, Any]

#: What a change gives back: what the caller wants to know about the value it saw,
#: and the bytes to store instead (None: leave the key alone).
Outcome = tuple[T, bytes | None]

MISSING: Seen = (None, None)

#: Lost races before a change gives up: far more than a few dozen threads changing
#: one key at once ever need, and each costs only a round trip.
ATTEMPTS = 64

#: After ``EAGER_RETRIES`` lost races in a row the loop pauses a random while before
#: each next read, up to ``FIRST_PAUSE``, doubled per loss, never past ``MAX_PAUSE``
#: (seconds). Writers in one process take turns anyway (they merge or add
#: together); writers in several processes do not, and without a pause the process
#: whose round trip is slowest can lose every race in a row. The first retry goes at
#: once: between two processes, losing one race is common and cheap. Measured on a
#: SharedBuffer from 4 processes x 4 threads: pausing after every loss, 8,761-9,697
#: increments/s; after the first, 13,540-15,707/s; after the third, some writers
#: still lost 64 races in a row.
EAGER_RETRIES = 1
FIRST_PAUSE, MAX_PAUSE = 0.00025, 0.016


class CasClient(Protocol):
    """The three calls the loop makes: a pymemcache client, a pool, or the cache tier's
    guarded client (whose failures are ``CacheUnavailable``)."""

    def gets(self, key: str) -> Any: ...
    def add(self, key: str, value: bytes, expire: int = 0, noreply: bool = False) -> bool: ...
    def cas(
        self, key: str, value: bytes, cas: Any, expire: int = 0, noreply: bool = False
    ) -> Any: ...


class Contended(CacheUnavailable):
    """Every attempt to change a memcache key lost its race to another writer.

    Nothing was stored: each ``add`` or ``cas`` that failed was refused whole. A
    ``CacheUnavailable``, since the cache could not take the change.
    """


def as_seen(found: Any) -> Seen:
    """What ``gets`` answered, with pymemcache's ``HashClient``'s plain None (its answer
    for a server it is skipping) read as a missing key."""
    return found if isinstance(found, tuple) else MISSING


def store_if_unchanged(key: str, value: bytes, seen: Seen, expire: int) -> Steps[bool]:
    """Store ``value`` if ``key`` still holds what ``seen`` read: ``add`` where it was
    missing, ``cas`` with its token otherwise. False when another writer came first."""
    raw, token = seen
    if raw is None:
        stored = yield Memcache("add", (key, value, expire, False))
    else:
        stored = yield Memcache("cas", (key, value, token, expire, False))
    return stored is True


def on(client: Any) -> Callable[[Effect], Any]:
    """Carry out memcache effects on ``client`` in this thread (for ``drive``): each a
    call of its method; and pauses, with ``time.sleep``."""

    def call(effect: Effect) -> Any:
        if isinstance(effect, Memcache):
            return getattr(client, effect.method)(*effect.args)
        if isinstance(effect, Sleep):
            time.sleep(effect.seconds)
            return None
        raise TypeError(f"a memcache client cannot carry out {effect!r}")

    return call


def change_key(
    client: CasClient,
    key: str,
    change: Callable[[bytes | None], Outcome[T]],
    *,
    expire: int,
    attempts: int = ATTEMPTS,
    first: Seen | None = None,
) -> T:
    """``changing`` carried out on ``client`` in this thread."""
    return drive(changing(key, change, expire=expire, attempts=attempts, first=first), on(client))


def changing(
    key: str,
    change: Callable[[bytes | None], Outcome[T]],
    *,
    expire: int,
    attempts: int = ATTEMPTS,
    first: Seen | None = None,
    read: Callable[[], Steps[Seen]] | None = None,
) -> Steps[T]:
    """Apply ``change`` to the value of ``key`` (None when missing) until it sticks.

    ``change`` returns ``(result, new)``: ``new`` is stored (with ``expire``) unless it
    is None or the value already; ``result`` of the attempt that stored, or left the
    key alone, is returned. ``first`` is a read made already (``MISSING`` to try an
    ``add`` before any read), so the first attempt saves a round trip; ``read`` reads
    the key some other way (the cache tier reads a stash along with a record).
    Raises ``Contended`` after ``attempts`` lost races; errors of ``client`` propagate.
    """
    seen = first
    for attempt in range(attempts):
        if seen is None:
            seen = (
                (yield from read())
                if read is not None
                else as_seen((yield Memcache("gets", (key,))))
            )
        result, new = change(seen[0])
        if new is None or new == seen[0] or (yield from store_if_unchanged(key, new, seen, expire)):
            return result
        seen = None  # someone else wrote it: read again (after a pause: EAGER_RETRIES)
        if attempt >= EAGER_RETRIES:
            losses = attempt - EAGER_RETRIES
            yield Sleep(random.uniform(0.0, min(MAX_PAUSE, FIRST_PAUSE * 2**losses)))
    raise Contended(f"could not change {key}: {attempts} attempts lost their race")


def change_stash(
    client: CasClient,
    key: str,
    change: Callable[[Stash], Stash | None],
    *,
    attempts: int = ATTEMPTS,
) -> Stash:
    """``changing_stash`` carried out on ``client`` in this thread."""
    return drive(changing_stash(key, change, attempts=attempts), on(client))


def changing_stash(
    key: str,
    change: Callable[[Stash], Stash | None],
    *,
    attempts: int = ATTEMPTS,
) -> Steps[Stash]:
    """Apply ``change`` to the ``delayed_incr`` stash at ``key``; return the stash it was
    applied to, as it was (live: see ``Stash.live``).

    ``change`` returning None or an equal stash leaves the key alone. A stash never
    expires: it holds acknowledged increments. Raises ``Contended`` as ``change_key``.
    """

    def on_stash(raw: bytes | None) -> Outcome[Stash]:
        current = Stash.decode(raw).live()
        new = change(current)
        return current, None if new is None or new == current else new.encode()

    stash: Stash = yield from changing(key, on_stash, expire=0, attempts=attempts)
    return stash
