"""What this process last saw in each ``delayed_incr`` stash: hints that save round trips.

Every read of a stash (a read of the counter, each write's merge) notes what it
held. A write then asks memcache to take the stash only when it was last seen
holding something, resolves unsure writes only when some were seen waiting,
and waits for a set only when one was seen running. A hint that is out of date
costs a round trip that finds nothing, or a wait that its cap bounds; never a
wrong count, since each change of the stash is a ``cas`` on what it holds then.
"""

from __future__ import annotations

import threading

from ..core.stash import Stash


class StashSightings:
    """The last sighting of each stash key, changed by many threads at once.

    Every update takes ``_lock``: a note changes three maps together, so no
    reader sees half of one. Reads take no lock; a membership test of a set or
    a dict is one atomic step, and a read that misses a concurrent note is
    only a stale hint (see the module docstring).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # seen holding something: only these cost a take
        self._unsure: set[str] = set()  # seen holding unsure writes nobody was resolving
        self._setters: dict[str, tuple[str, float]] = {}  # seen under a set: (token, deadline)

    def note(self, stash_key: str, raw: bytes | None) -> Stash:
        """Remember what the stash holds as read (``raw``); return it, live."""
        stash = Stash.decode(raw).live()
        with self._lock:
            _mark(self._pending, stash_key, bool(stash.pending))
            _mark(self._unsure, stash_key, bool(stash.claimable()))
            if stash.setter is not None:
                self._setters[stash_key] = stash.setter
            else:
                self._setters.pop(stash_key, None)
        return stash

    def pending_seen(self, stash_key: str) -> bool:
        return stash_key in self._pending

    def unsure_seen(self, stash_key: str) -> bool:
        return stash_key in self._unsure

    def setter_seen(self, stash_key: str) -> tuple[str, float] | None:
        return self._setters.get(stash_key)

    def expect_pending(self, stash_key: str, expected: bool = True) -> None:
        """This process is about to leave something pending there (or took it all)."""
        with self._lock:
            _mark(self._pending, stash_key, expected)

    def expect_unsure(self, stash_key: str, expected: bool = True) -> None:
        """This process is about to leave an unsure write there (or claimed them all)."""
        with self._lock:
            _mark(self._unsure, stash_key, expected)

    def forget_setter(self, stash_key: str) -> None:
        with self._lock:
            self._setters.pop(stash_key, None)


def _mark(keys: set[str], key: str, present: bool) -> None:
    if present:
        keys.add(key)
    else:
        keys.discard(key)
