"""The cached total of each counter: read, refilled safely, merged into by writers.

Protocol (see ``core/record.py`` for the record itself):

* Writers, after a shard write commits, merge the shard's new
  ``(version, value)`` into the record if there is one. No record: nothing
  to do.
* A reader that finds no complete record first makes sure a record exists
  and notes its epoch, *then* reads every shard, then merges that snapshot
  in with ``cas`` and marks it complete. A write that committed after the
  snapshot merged its state after the record existed, so the reader's ``cas``
  either sees it or fails and re-reads it; if the record vanished or changed
  epoch meanwhile the reader returns its snapshot without caching it.
* A merge that memcache does not answer leaves a record that may miss a
  write. The key is suspect (``backlog.py``) and deleted on this process's next
  cache call, so the next reader rebuilds it; until then it is bounded by the TTL.
* A value at a record's key that is not a record we could have written (see
  ``Record.parse``) is a miss: logged, replaced by a fresh record, and the total
  read again from Datastore. A writer's merge deletes it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from ..core import parse
from ..core.effects import Batched, Memcache, Steps
from ..core.record import Record, ShardState
from ..errors import CacheUnavailable
from .backlog import Backlog
from .cas import MISSING, Contended, Outcome, Seen, as_seen, changing, store_if_unchanged
from .sightings import StashSightings

if TYPE_CHECKING:
    from .guarded import GuardedClient

log = logging.getLogger("sharded_counter")

#: The shards' states of the counters a fill needs, by record key (steps that read them).
SnapshotSteps = Callable[[list[str]], Steps[Mapping[str, Iterable[ShardState]]]]


class CachedRecords:
    """Reads, fills and merges the cached records, kept ``ttl`` seconds; ``enabled`` says
    whether there is a memcache at all. Every method that calls memcache is steps."""

    def __init__(
        self,
        enabled: Callable[[], bool],
        backlog: Backlog,
        sightings: StashSightings,
        *,
        ttl: int,
    ) -> None:
        self._enabled = enabled
        self._backlog = backlog
        self._sightings = sightings
        self._ttl = ttl

    def read_many(self, pairs: Sequence[tuple[str, str]]) -> Steps[list[tuple[Record | None, int]]]:
        """Each counter's complete record (or None) and what its stash owes, in one
        ``get_many``. Raises CacheUnavailable."""
        if not self._backlog.empty:
            yield from self._backlog.catch_up()
        found = yield Memcache("get_many", ([key for pair in pairs for key in pair],))
        return [self._found(found, record_key, stash_key) for record_key, stash_key in pairs]

    def read(self, record_key: str, stash_key: str) -> Steps[tuple[Record | None, int]]:
        """``read_many`` of one counter: its record and its stash, in one ``get_many``.

        The read of a cached total, so kept to the least work: no list of pairs."""
        if not self._backlog.empty:
            yield from self._backlog.catch_up()
        found = yield Memcache("get_many", ([record_key, stash_key],))
        return self._found(found, record_key, stash_key)

    def read_now(
        self, calls: GuardedClient, record_key: str, stash_key: str
    ) -> tuple[Record | None, int] | None:
        """``read`` made here, through ``calls``, as plain calls: the same ``get_many``
        and the same reading of it, without steps to drive (the blocking cached read's
        fast path). None, with nothing sent, when there is a backlog to catch up first:
        then ``read``'s steps must run. Raises CacheUnavailable."""
        if not self._backlog.empty:
            return None
        return self._found(calls.get_many([record_key, stash_key]), record_key, stash_key)

    def _found(
        self, found: Mapping[str, bytes], record_key: str, stash_key: str
    ) -> tuple[Record | None, int]:
        """One counter's complete record (or None) and what its stash owes, as read."""
        record = _decode(found.get(record_key))
        raw_stash = found.get(stash_key)
        stash = self._sightings.note(stash_key, raw_stash)
        owed = stash.owed if raw_stash else 0  # an empty stash owes nothing
        return (record if record is not None and record.complete else None), owed

    def peek(self, record_key: str) -> Steps[Record | None]:
        """The record as it is (complete or not), without touching it."""
        seen = as_seen((yield Memcache("gets", (record_key,))))
        return _decode(seen[0])

    def invalidate(self, record_key: str) -> Steps[None]:
        """Drop a record that may be stale. Never raises: failing, it is dropped later."""
        if not self._enabled():
            return
        try:
            yield Memcache("delete", (record_key,))
        except CacheUnavailable:
            self._backlog.suspect(record_key)

    # -- writers ----------------------------------------------------------------------

    def merge(self, record_key: str, stash_key: str, states: Iterable[ShardState]) -> Steps[None]:
        """A writer's post-commit step. Never raises: memcache trouble makes the key suspect.

        Writers of one counter in this process merge together (``batches.py``).
        """
        if not self._enabled():
            return
        yield Batched(
            record_key, list(states), lambda taken: self._merge_now(record_key, stash_key, taken)
        )

    def _merge_now(self, record_key: str, stash_key: str, states: list[ShardState]) -> Steps[None]:
        """One merge of ``states`` into the record, the stash read along for the sightings."""

        def read_both() -> Steps[Seen]:
            found = yield Memcache("gets_many", ([record_key, stash_key],))
            self._sightings.note(stash_key, found.get(stash_key, MISSING)[0])
            seen: Seen = found.get(record_key, MISSING)
            return seen

        def merge_into(raw: bytes | None) -> Outcome[bool]:
            # The answer: may the record stay? One we cannot read goes.
            if raw is None:
                return True, None  # nothing cached; the next reader reads the shards
            record = _decode(raw)
            if record is None:
                return False, None
            merged = record.merged(states)
            return True, None if merged == record else merged.encode()

        try:
            if not self._backlog.empty:
                yield from self._backlog.catch_up()
            try:
                keep = yield from changing(record_key, merge_into, expire=self._ttl, read=read_both)
            except Contended:
                keep = False  # drop the record rather than leave it without our write
            if not keep:
                yield Memcache("delete", (record_key,))
        except CacheUnavailable:
            self._backlog.suspect(record_key)

    # -- readers that refill ----------------------------------------------------------------

    def fill_many(
        self, record_keys: Sequence[str], snapshot: SnapshotSteps
    ) -> Steps[dict[str, int]]:
        """Read the shards of the counters that need it through ``snapshot`` (all at once)
        and cache their totals where that is safe.

        Returns each total of the shards (from the cache record when it already
        holds newer writes). Raises CacheUnavailable only if memcache fails
        before the snapshot was taken; after that it returns the snapshot.
        """
        if not self._backlog.empty:
            yield from self._backlog.catch_up()
        totals: dict[str, int] = {}
        opened: dict[str, Seen] = {}
        for key in record_keys:
            seen = yield from self._open(key)
            record = _decode(seen[0])
            if record is not None and record.complete:
                totals[key] = record.total  # filled by someone else meanwhile
            else:
                opened[key] = seen
        if opened:
            states = yield from snapshot(list(opened))
            for key, seen in opened.items():
                totals[key] = yield from self._complete(key, seen, list(states[key]))
        return totals

    def _open(self, record_key: str) -> Steps[Seen]:
        """Make sure a record exists before the snapshot is taken; return it as read."""
        seen = as_seen((yield Memcache("gets", (record_key,))))
        if _decode(seen[0]) is None:
            # Missing, or something we cannot read sits there: one attempt to put a
            # fresh record in its place. Whoever beats us leaves a record too.
            yield from store_if_unchanged(record_key, Record.new().encode(), seen, self._ttl)
            seen = as_seen((yield Memcache("gets", (record_key,))))
        return seen

    def _complete(self, record_key: str, opened: Seen, states: list[ShardState]) -> Steps[int]:
        """Merge a snapshot into the record opened before it was taken, and mark it complete."""
        snapshot_total = sum(s.value for s in states)
        record = _decode(opened[0])
        if record is None:
            return snapshot_total
        epoch = record.epoch

        def complete(raw: bytes | None) -> Outcome[int | None]:
            # The answer: the cached total, or None when the snapshot may be stale.
            current = _decode(raw)
            if current is None or current.epoch != epoch:
                return None, None  # evicted while we read the shards
            merged = current.merged(states, complete=True)
            return merged.total, merged.encode()

        try:
            total = yield from changing(record_key, complete, expire=self._ttl, first=opened)
        except CacheUnavailable:  # or Contended: the snapshot is the answer either way
            return snapshot_total
        return snapshot_total if total is None else total


def _decode(raw: bytes | None) -> Record | None:
    """The record in ``raw``; None when there is none, or it is garbled (then logged)."""
    if raw is None:
        return None
    record = Record.decode(raw)
    if record is None:
        _report_garbled(parse.fingerprint(raw), parse.describe(raw))
    return record


@functools.lru_cache(maxsize=256)
def _report_garbled(fingerprint: str, shown: str) -> None:
    """Log a garbled record once per distinct value (``fingerprint``; while among the
    last 256): a reader, its refill and a writer's merge may each meet the same bytes."""
    log.warning(
        "a cached counter record in memcache is garbled: %s; discarded, and the total "
        "read again from Datastore (docs/security.md)",
        shown,
    )
