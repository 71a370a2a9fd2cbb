"""``delayed_incr``: increments stashed while their shard write could not be made, and the
folds that take them into a later write (see ``core/stash.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.effects import Memcache, Steps
from ..core.stash import Stash
from ..core.validation import fits_int64
from ..errors import CacheUnavailable, CounterOverflowError
from .backlog import Backlog, StashChange
from .cas import as_seen, changing_stash
from .sightings import StashSightings


class PendingStashes:
    """Stashing, taking and settling what waits in each counter's stash (as steps)."""

    def __init__(self, backlog: Backlog, sightings: StashSightings) -> None:
        self._backlog = backlog
        self._sightings = sightings

    def stash(self, stash_key: str, delta: int, *, within_int64: bool = False) -> Steps[int]:
        """Add ``delta`` to the pending stash; returns what was pending before. Raises
        CacheUnavailable if it cannot.

        A ``delta`` that would take the pending amount out of the signed 64-bit range
        is refused, nothing changed: one write could never carry it, and a stash
        holding it would read back as garbled (core/parse.py). With ``within_int64``
        (a shared buffer's increment) that is CounterOverflowError; otherwise (a
        failed write's stash) CacheUnavailable, as if memcache had refused it, so the
        increment is not recorded.
        """

        def add(stash: Stash) -> Stash:
            if not fits_int64(stash.pending + delta):
                why = f"{stash.pending} pending plus {delta} leaves the signed 64-bit range"
                raise CounterOverflowError(why) if within_int64 else CacheUnavailable(why)
            return stash.added(delta)

        self._sightings.expect_pending(stash_key)
        before = yield from changing_stash(stash_key, add)
        return before.pending

    def take_stash(
        self, stash_key: str, token: str, deadline: float, *, look: bool = False
    ) -> Steps[int]:
        """Take the whole pending stash for the fold ``token`` (0 when there is none).

        The key keeps a marker of the fold until ``settle_fold``. Nothing is
        taken while a set is running. Without ``look`` it asks memcache only
        when a stash was seen lately (every read and every write's merge
        looks), saving a round trip per write. A take whose reply is lost is
        put back on this process's next cache call. Raises CacheUnavailable.
        """
        if not look and not self._sightings.pending_seen(stash_key):
            return 0
        try:
            before = yield from changing_stash(
                stash_key,
                lambda s: s.taken(token, deadline) if s.pending and s.setter is None else None,
            )
        except CacheUnavailable:
            self._backlog.settle_later(stash_key, _fold_over(token, put_back=True))
            raise
        if not before.pending:
            self._sightings.expect_pending(stash_key, False)
        return before.pending if before.setter is None else 0

    def settle_fold(self, stash_key: str, token: str, *, put_back: bool) -> Steps[bool]:
        """The fold ``token`` is over: drop its marker, and with ``put_back`` return what it
        took to the stash. Never raises: if memcache does not answer it is done later.

        Returns whether the stash is done with the write's token. It is not when
        memcache did not answer, or when the fold outlived its deadline and its fold
        part is an unsure entry now (core/stash.py): the resolutions look for the token,
        so the writer keeps it pinned in its slot (paths/picker.py) until they are over.
        """
        change = _fold_over(token, put_back)
        try:
            before = yield from changing_stash(stash_key, change)
        except CacheUnavailable:
            self._backlog.settle_later(stash_key, change)
            return False
        return not change(before).mentions(token)

    def peek_stash(self, stash_key: str) -> Steps[int]:
        """What the stash adds to its counter's shards (see ``Stash.owed``)."""
        raw, _ = as_seen((yield Memcache("gets", (stash_key,))))
        return Stash.decode(raw).live().owed

    def peek_stashes(self, stash_keys: Sequence[str]) -> Steps[dict[str, int]]:
        """``peek_stash`` for many stashes in one ``get_many``."""
        found = yield Memcache("get_many", (list(stash_keys),))
        return {key: Stash.decode(found.get(key)).live().owed for key in stash_keys}


def _fold_over(token: str, put_back: bool) -> StashChange:
    """The end of the fold ``token``: its marker goes, and with ``put_back`` what it took
    waits again. Repeating it changes nothing, since the marker is gone."""
    return (lambda s: s.released(token)) if put_back else (lambda s: s.landed(token))
