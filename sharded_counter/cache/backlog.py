"""What failed memcache calls left to do, done by this process's next call that reaches it.

* A record whose merge (or delete) memcache did not answer may miss a write: it
  is *suspect*, and deleted, so that the next reader rebuilds it from the shards.
  Until then it is bounded by its TTL.
* The end of a fold or of a resolution that memcache did not hear is a change of
  the stash still to make. Each such change is safe to repeat.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

from ..core.effects import Memcache, Steps
from ..core.stash import Stash
from ..errors import CacheUnavailable
from .cas import changing_stash

#: A change of a stash that can be made late: every one of them is safe to repeat.
StashChange = Callable[[Stash], Stash]

#: The most suspect records, and the most stash changes, kept for memcache's return.
SUSPECTS_CAP = 5_000
UNSETTLED_CAP = 5_000

log = logging.getLogger("sharded_counter")


class Backlog:
    """Suspect records and unsettled stash changes, kept until memcache answers."""

    def __init__(
        self, suspects_cap: int = SUSPECTS_CAP, unsettled_cap: int = UNSETTLED_CAP
    ) -> None:
        self._lock = threading.Lock()
        self._suspects: dict[str, None] = {}  # a set, in the order first suspected
        self._unsettled: collections.deque[tuple[str, StashChange]] = collections.deque()
        self._suspects_cap = suspects_cap
        self._unsettled_cap = unsettled_cap
        self.forgotten = 0  # suspects and stash changes dropped past a cap, ever
        self._warned = False  # one warning per stretch of forgetting (until caught up)

    def suspect(self, record_key: str) -> None:
        with self._lock:
            self._suspects[record_key] = None
            if len(self._suspects) > self._suspects_cap:
                del self._suspects[next(iter(self._suspects))]
                self._forgot("a suspect cached total (stale until its TTL at most)")

    def settle(self, stash_key: str, change: StashChange) -> Steps[Stash | None]:
        """Make ``change`` now, or once memcache answers again. Returns the stash as the
        change left it, or None when it waits for later. Never raises."""
        try:
            before = yield from changing_stash(stash_key, change)
        except CacheUnavailable:
            self.settle_later(stash_key, change)
            return None
        return change(before)

    def settle_later(self, stash_key: str, change: StashChange) -> None:
        with self._lock:
            self._unsettled.append((stash_key, change))
            if len(self._unsettled) > self._unsettled_cap:
                self._unsettled.popleft()
                self._forgot("a change of delayed_incr (settled by the protocol instead)")

    def _forgot(self, what: str) -> None:
        # Called with _lock held.
        self.forgotten += 1
        if not self._warned:
            self._warned = True
            log.warning(
                "memcache has been failing for a while: past %d suspect totals or %d "
                "changes of delayed_incr this process forgets the oldest, here %s",
                self._suspects_cap,
                self._unsettled_cap,
                what,
            )

    def sizes(self) -> dict[str, int]:
        """How many suspects and stash changes are kept now (each at most its cap)."""
        return {"suspects": len(self._suspects), "unsettled": len(self._unsettled)}

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
            self._warned = False
            return
        with self._lock:
            pending = list(self._suspects)
        for key in pending:
            yield Memcache("delete", (key,))
            with self._lock:
                self._suspects.pop(key, None)
        with self._lock:
            self._warned = False

    def _settle_late(self) -> Steps[None]:
        if not self._unsettled:
            return
        with self._lock:
            unsettled, self._unsettled = list(self._unsettled), collections.deque()
        for index, (stash_key, change) in enumerate(unsettled):
            try:
                yield from changing_stash(stash_key, change)
            except CacheUnavailable:
                with self._lock:
                    # Oldest first again, ahead of any added meanwhile; the cap still holds.
                    kept = collections.deque(unsettled[index:])
                    kept.extend(self._unsettled)
                    while len(kept) > self._unsettled_cap:
                        kept.popleft()
                        self._forgot("a change of delayed_incr (settled by the protocol instead)")
                    self._unsettled = kept
                raise
