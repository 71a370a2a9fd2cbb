"""What this process last saw in each ``delayed_incr`` stash: hints that save round trips.

Every read of a stash (a read of the counter, each write's merge) notes what it
held. A write then asks memcache to take the stash only when it was last seen
holding something, resolves unsure writes only when some were seen waiting,
and waits for a set only when one was seen running. A hint that is out of date
costs a round trip that finds nothing, or a wait that its cap bounds; never a
wrong count, since each change of the stash is a ``cas`` on what it holds then.

So each kind of sighting is kept for at most ``SIGHTINGS_CAP`` stash keys, the
least recently noted forgotten first: a process that touches many counters holds
bounded memory, and a forgotten sighting is only a hint lost (the next read of
that stash notes it again).
"""

from __future__ import annotations

import threading
from typing import TypeVar

from ..core.stash import Stash

#: The most stash keys each kind of sighting (pending, unsure, a set running) holds.
SIGHTINGS_CAP = 10_000

V = TypeVar("V")

#: What an empty (or missing) stash reads as; Stash values are never changed in place.
_EMPTY = Stash()


class StashSightings:
    """The last sighting of each stash key, changed by many threads at once.

    Every update takes ``_lock``: a note changes three maps together, so no
    reader sees half of one. Reads take no lock; a membership test of a set or
    a dict is one atomic step, and a read that misses a concurrent note is
    only a stale hint (see the module docstring).
    """

    def __init__(self, cap: int = SIGHTINGS_CAP) -> None:
        self._lock = threading.Lock()
        self.cap = cap
        # Dicts in the order last noted, so that the oldest goes first past the cap.
        self._pending: dict[str, None] = {}  # seen holding something: only these cost a take
        self._unsure: dict[str, None] = {}  # seen holding unsure writes nobody was resolving
        self._setters: dict[str, tuple[str, float]] = {}  # seen under a set: (token, deadline)

    def note(self, stash_key: str, raw: bytes | None) -> Stash:
        """Remember what the stash holds as read (``raw``); return it, live."""
        if not raw and not self._noted(stash_key):
            # An empty stash seen empty again, the common case of a read: nothing to
            # decode and nothing to change, so no lock (a note racing this one is only
            # ordered after it, as the lock would have ordered them).
            return _EMPTY
        stash = Stash.decode(raw).live()
        with self._lock:
            _mark(self._pending, stash_key, bool(stash.pending), self.cap)
            _mark(self._unsure, stash_key, bool(stash.claimable()), self.cap)
            if stash.setter is not None:
                _newest(self._setters, stash_key, stash.setter, self.cap)
            else:
                self._setters.pop(stash_key, None)
        return stash

    def _noted(self, stash_key: str) -> bool:
        """Does any kind of sighting hold ``stash_key``?"""
        return stash_key in self._pending or stash_key in self._unsure or stash_key in self._setters

    def pending_seen(self, stash_key: str) -> bool:
        return stash_key in self._pending

    def unsure_seen(self, stash_key: str) -> bool:
        return stash_key in self._unsure

    def setter_seen(self, stash_key: str) -> tuple[str, float] | None:
        return self._setters.get(stash_key)

    def expect_pending(self, stash_key: str, expected: bool = True) -> None:
        """This process is about to leave something pending there (or took it all)."""
        with self._lock:
            _mark(self._pending, stash_key, expected, self.cap)

    def expect_unsure(self, stash_key: str, expected: bool = True) -> None:
        """This process is about to leave an unsure write there (or claimed them all)."""
        with self._lock:
            _mark(self._unsure, stash_key, expected, self.cap)

    def forget_setter(self, stash_key: str) -> None:
        with self._lock:
            self._setters.pop(stash_key, None)

    def sizes(self) -> dict[str, int]:
        """How many stash keys each kind of sighting holds now (each at most ``cap``)."""
        return {
            "pending": len(self._pending),
            "unsure": len(self._unsure),
            "setters": len(self._setters),
        }


def _mark(keys: dict[str, None], key: str, present: bool, cap: int) -> None:
    if present:
        _newest(keys, key, None, cap)
    else:
        keys.pop(key, None)


def _newest(seen: dict[str, V], key: str, value: V, cap: int) -> None:
    """Note ``key`` as the newest sighting; past ``cap`` the oldest is forgotten."""
    seen.pop(key, None)
    seen[key] = value
    if len(seen) > cap:
        del seen[next(iter(seen))]
