"""What failed memcache calls left to do, done by this process's next call that reaches it.

* A record whose merge (or delete) memcache did not answer may miss a write: it
  is *suspect*, and deleted, so that the next reader rebuilds it from the shards.
  Until then it is bounded by its TTL.
* The end of a fold or of a resolution that memcache did not hear is a change of
  the stash still to make. Each such change is safe to repeat.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..core.effects import Memcache, Steps
from ..core.stash import Stash
from ..errors import CacheUnavailable
from .cas import changing_stash

#: A change of a stash that can be made late: every one of them is safe to repeat.
StashChange = Callable[[Stash], Stash]


class Backlog:
    """Suspect records and unsettled stash changes, kept until memcache answers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._suspects: set[str] = set()
        self._unsettled: list[tuple[str, StashChange]] = []

    def suspect(self, record_key: str) -> None:
        with self._lock:
            self._suspects.add(record_key)

    def settle(self, stash_key: str, change: StashChange) -> Steps[None]:
        """Make ``change`` now, or once memcache answers again. Never raises."""
        try:
            yield from changing_stash(stash_key, change)
        except CacheUnavailable:
            self.settle_later(stash_key, change)

    def settle_later(self, stash_key: str, change: StashChange) -> None:
        with self._lock:
            self._unsettled.append((stash_key, change))

    @property
    def empty(self) -> bool:
        """Nothing left to do: the common case, which callers check without starting
        ``catch_up``'s steps (a read of the cached total is that cheap)."""
        return not (self._unsettled or self._suspects)

    def catch_up(self) -> Steps[None]:
        """Do what is left, before the call that asks. Raises CacheUnavailable, keeping
        what it could not do for the next call."""
        yield from self._settle_late()
        if not self._suspects:  # a plain read: the common case, nothing left, takes no lock
            return
        with self._lock:
            pending = list(self._suspects)
        for key in pending:
            yield Memcache("delete", (key,))
            with self._lock:
                self._suspects.discard(key)

    def _settle_late(self) -> Steps[None]:
        if not self._unsettled:
            return
        with self._lock:
            unsettled, self._unsettled = self._unsettled, []
        for index, (stash_key, change) in enumerate(unsettled):
            try:
                yield from changing_stash(stash_key, change)
            except CacheUnavailable:
                with self._lock:
                    self._unsettled.extend(unsettled[index:])
                raise
