"""The cache tier: cached totals, their safe refill, and the ``delayed_incr`` stash.

``CacheTier`` is what the rest of the library talks to. It is a facade over
parts of one job each, every one handed only what it uses:

* ``guarded.py``: every call to memcache, its failures as ``CacheUnavailable``,
  and the outage logged once when it starts and once when it ends;
* ``records.py``: the cached records (read, filled, merged; ``batches.py``
  groups the writers of one record);
* ``stashes.py``, ``unsure.py``, ``sets.py``: the changes of the stash, for
  pending increments and folds, unsure writes, and ``count = v``;
* ``sightings.py``: what this process last saw in each stash;
* ``backlog.py``: what failed calls left to do, done on the next call;
* ``leases.py``: hints that a process is writing a shard right now.

Composed rather than mixed in, so that each part's dependencies are the ones
its constructor takes, not whatever another mixin happens to set on ``self``.

memcache trouble never fails a Datastore write and never blocks longer than
the configured timeouts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from ..core.record import Record, ShardState
from ..core.stash import Stash, Unsure
from .backlog import Backlog
from .client import MemcacheClient
from .guarded import GuardedClient
from .leases import ShardLeases
from .pending_names import PendingNames
from .records import CachedRecords
from .sets import SetCoordination
from .sightings import StashSightings
from .stashes import PendingStashes
from .unsure import UnsureWrites


class CacheTier:
    """The counters' memcache, through ``client`` (None: no memcached configured);
    records are kept ``ttl`` seconds. Each method is documented where it is done."""

    def __init__(self, client: MemcacheClient | None, *, ttl: int) -> None:
        self._calls = GuardedClient(client)
        self._sightings = StashSightings()
        self._backlog = Backlog(self._calls)
        self._records = CachedRecords(self._calls, self._backlog, self._sightings, ttl=ttl)
        self._stashes = PendingStashes(self._calls, self._backlog, self._sightings)
        self._unsure = UnsureWrites(self._calls, self._backlog, self._sightings)
        self._sets = SetCoordination(self._calls, self._sightings)
        self._leases = ShardLeases(self._calls)

    @property
    def _client(self) -> MemcacheClient | None:
        """The memcache client; swapping it (the bench does) swaps it for every part."""
        return self._calls.client

    @_client.setter
    def _client(self, client: MemcacheClient | None) -> None:
        self._calls.client = client

    @property
    def enabled(self) -> bool:
        return self._calls.client is not None

    def pending_names(self, key_prefix: str, scope: str) -> PendingNames:
        """The names of counters with amounts waiting in their stash to be written by a
        shared buffer's flusher (pending_names.py), for one scope."""
        return PendingNames(self._calls, key_prefix, scope)

    # -- cached totals: records.py ---------------------------------------------------------

    def read(self, record_key: str, stash_key: str) -> tuple[Record | None, int]:
        """The complete record (or None) and the pending stash. Raises CacheUnavailable."""
        return self._records.read_many([(record_key, stash_key)])[0]

    def read_many(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[Record | None, int]]:
        """``read`` for many counters in one ``get_many``."""
        return self._records.read_many(pairs)

    def fill(self, record_key: str, snapshot: Callable[[], Iterable[ShardState]]) -> int:
        """Read the shards through ``snapshot`` and cache their total when that is safe."""
        return self.fill_many([record_key], lambda _keys: {record_key: snapshot()})[record_key]

    def fill_many(
        self,
        record_keys: Sequence[str],
        snapshot: Callable[[list[str]], Mapping[str, Iterable[ShardState]]],
    ) -> dict[str, int]:
        """``fill`` for many counters: ``snapshot`` reads the shards of all that need it at once."""
        return self._records.fill_many(record_keys, snapshot)

    def merge(self, record_key: str, stash_key: str, states: Iterable[ShardState]) -> None:
        """A writer's post-commit step. Never raises."""
        self._records.merge(record_key, stash_key, states)

    def peek(self, record_key: str) -> Record | None:
        """The record as it is (complete or not), without touching it."""
        return self._records.peek(record_key)

    def invalidate(self, record_key: str) -> None:
        """Drop a record that may be stale. Never raises."""
        self._records.invalidate(record_key)

    def forget(self, *keys: str) -> None:
        """Delete ``keys``. Raises CacheUnavailable."""
        for key in keys:
            self._calls.delete(key)

    # -- shard leases: leases.py -------------------------------------------------------------

    def lease(self, key: str) -> bool | None:
        """Lease a shard for one write: True granted, False held by another writer, None
        memcache could not say. Never raises."""
        return self._leases.take(key)

    def end_lease(self, key: str) -> None:
        """End a lease. Never raises."""
        self._leases.end(key)

    # -- pending increments and folds: stashes.py ------------------------------------------

    def stash(self, stash_key: str, delta: int, *, within_int64: bool = False) -> int:
        """Add ``delta`` to the pending stash; returns what was pending before. Raises
        CacheUnavailable if it cannot (and CounterOverflowError: see PendingStashes)."""
        return self._stashes.stash(stash_key, delta, within_int64=within_int64)

    def take_stash(self, stash_key: str, token: str, deadline: float, *, look: bool = False) -> int:
        """Take the whole pending stash for the fold ``token``. Raises CacheUnavailable."""
        return self._stashes.take_stash(stash_key, token, deadline, look=look)

    def settle_fold(self, stash_key: str, token: str, *, put_back: bool) -> bool:
        """The fold ``token`` is over; is the stash done with its token? Never raises."""
        return self._stashes.settle_fold(stash_key, token, put_back=put_back)

    def peek_stash(self, stash_key: str) -> int:
        """What the stash adds to its counter's shards (see ``Stash.owed``)."""
        return self._stashes.peek_stash(stash_key)

    def peek_stashes(self, stash_keys: Sequence[str]) -> dict[str, int]:
        """``peek_stash`` for many stashes in one ``get_many``."""
        return self._stashes.peek_stashes(stash_keys)

    # -- unsure writes: unsure.py -------------------------------------------------------------

    def make_unsure(
        self, stash_key: str, token: str, amount: int, shard: int, *, folded: int = 0
    ) -> None:
        """Keep the write ``token`` as an unsure entry. Raises CacheUnavailable."""
        self._unsure.make_unsure(stash_key, token, amount, shard, folded=folded)

    def claim_unsure(
        self, stash_key: str, claim: str, deadline: float
    ) -> tuple[Stash, dict[str, Unsure]]:
        """Claim every unsure write nobody is resolving. Raises CacheUnavailable."""
        return self._unsure.claim_unsure(stash_key, claim, deadline)

    def finish_unsure(self, stash_key: str, token: str, claim: str, *, written: bool) -> None:
        """End ``claim``'s resolution of ``token``. Never raises."""
        self._unsure.finish_unsure(stash_key, token, claim, written=written)

    def unsure_to_pending(self, stash_key: str, token: str, claim: str, amount: int) -> None:
        """What the unsure write ``token`` still had to add waits as pending. Never raises."""
        self._unsure.unsure_to_pending(stash_key, token, claim, amount)

    def unsure_seen(self, stash_key: str) -> bool:
        """Did the last look at this stash find unsure writes nobody was resolving?"""
        return self._sightings.unsure_seen(stash_key)

    # -- count = v: sets.py --------------------------------------------------------------------

    def wait_out_set(self, stash_key: str, cap: float) -> None:
        """Hold a write while a set of the counter runs, if one was seen. Never raises."""
        self._sets.wait_out_set(stash_key, cap)

    def begin_set(self, stash_key: str, token: str, deadline: float) -> Stash:
        """Begin the set ``token``, waiting until ``deadline`` at the latest for another.
        Raises CacheUnavailable."""
        return self._sets.begin_set(stash_key, token, deadline)

    def end_set(self, stash_key: str, token: str, *, landed: bool) -> None:
        """The set ``token`` is over, and ``landed`` or not. Raises CacheUnavailable."""
        self._sets.end_set(stash_key, token, landed=landed)
