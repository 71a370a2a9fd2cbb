"""The cache tier: cached totals, their safe refill, and the ``delayed_incr`` stash.

``CacheSteps`` is what the counters' paths talk to: every method that calls
memcache is steps (core/effects.py), so the blocking and the asyncio shells
share it. ``CacheTier`` holds one, with the guarded client that carries out its
memcache calls in this thread, and offers each method as a plain call too. It
is a facade over parts of one job each, every one handed only what it uses:

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

import time
from collections.abc import Sequence
from typing import Any, TypeVar

from ..core.effects import Batched, Effect, Memcache, Sleep, Steps, drive
from ..core.record import Record, ShardState
from ..core.stash import Stash, Unsure
from .backlog import Backlog
from .batches import MergeBatches
from .client import MemcacheClient
from .guarded import GuardedClient
from .leases import ShardLeases
from .pending_names import PendingNames
from .records import CachedRecords, SnapshotSteps
from .sets import SetCoordination
from .sightings import StashSightings
from .stashes import PendingStashes
from .unsure import UnsureWrites

T = TypeVar("T")


class CacheSteps:
    """The cache tier's protocol, as steps; ``enabled`` says whether a memcache is
    configured, and records are kept ``ttl`` seconds. Each method is documented where
    it is done. Shared by the blocking and the asyncio shell of one process."""

    def __init__(self, enabled: Any, *, ttl: int) -> None:
        self.sightings = StashSightings()
        self.backlog = Backlog()
        self.records = CachedRecords(enabled, self.backlog, self.sightings, ttl=ttl)
        self.stashes = PendingStashes(self.backlog, self.sightings)
        self.unsure = UnsureWrites(self.backlog, self.sightings)
        self.sets = SetCoordination(self.sightings)
        self.leases = ShardLeases(enabled)

    # -- cached totals: records.py ---------------------------------------------------------

    def read(self, record_key: str, stash_key: str) -> Steps[tuple[Record | None, int]]:
        """The complete record (or None) and the pending stash. Raises CacheUnavailable."""
        return self.records.read(record_key, stash_key)  # its steps, without a frame of ours

    def fill(self, record_key: str, snapshot: SnapshotSteps) -> Steps[int]:
        """Read the shards through ``snapshot`` and cache their total when that is safe."""
        totals = yield from self.records.fill_many([record_key], snapshot)
        return totals[record_key]

    def unsure_seen(self, stash_key: str) -> bool:
        """Did the last look at this stash find unsure writes nobody was resolving?"""
        return self.sightings.unsure_seen(stash_key)

    def forget(self, *keys: str) -> Steps[None]:
        """Delete ``keys``. Raises CacheUnavailable."""
        for key in keys:
            yield Memcache("delete", (key,))


class CacheTier:
    """The counters' memcache, through ``client`` (None: no memcached configured);
    records are kept ``ttl`` seconds. ``steps`` is the protocol; every method here
    carries one of its steps out in this thread."""

    def __init__(self, client: MemcacheClient | None, *, ttl: int) -> None:
        self._calls = GuardedClient(client)
        self.steps = CacheSteps(lambda: self._calls.client is not None, ttl=ttl)
        self._batches: MergeBatches[Any] = MergeBatches()

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

    def run(self, steps: Steps[T]) -> T:
        """Carry out ``steps`` that ask for memcache (and pauses, and merges) in this thread."""
        return drive(steps, self.perform)

    def perform(self, effect: Effect) -> Any:
        """One effect of the cache tier's steps, done in this thread."""
        if isinstance(effect, Memcache):
            return getattr(self._calls, effect.method)(*effect.args)
        if isinstance(effect, Sleep):
            time.sleep(effect.seconds)
            return None
        if isinstance(effect, Batched):
            self._batches.merge(
                effect.key, effect.items, lambda taken: self.run(effect.merge(taken))
            )
            return None
        raise TypeError(f"the cache tier cannot carry out {effect!r}")

    def pending_names(self, key_prefix: str, scope: str) -> PendingNames:
        """The names of counters with amounts waiting in their stash to be written by a
        shared buffer's flusher (pending_names.py), for one scope."""
        return PendingNames(self._calls, key_prefix, scope)

    # -- the steps, as plain calls (see CacheSteps and the parts for what each does) -------

    def read(self, record_key: str, stash_key: str) -> tuple[Record | None, int]:
        return self.run(self.steps.read(record_key, stash_key))

    def read_now(self, record_key: str, stash_key: str) -> tuple[Record | None, int] | None:
        """``read`` without driving steps (``CachedRecords.read_now``): None when it
        would take more than its one ``get_many``. Raises CacheUnavailable."""
        return self.steps.records.read_now(self._calls, record_key, stash_key)

    def read_many(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[Record | None, int]]:
        return self.run(self.steps.records.read_many(pairs))

    def fill(self, record_key: str, snapshot: SnapshotSteps) -> int:
        return self.run(self.steps.fill(record_key, snapshot))

    def fill_many(self, record_keys: Sequence[str], snapshot: SnapshotSteps) -> dict[str, int]:
        return self.run(self.steps.records.fill_many(record_keys, snapshot))

    def merge(self, record_key: str, stash_key: str, states: Sequence[ShardState]) -> None:
        self.run(self.steps.records.merge(record_key, stash_key, states))

    def peek(self, record_key: str) -> Record | None:
        return self.run(self.steps.records.peek(record_key))

    def invalidate(self, record_key: str) -> None:
        self.run(self.steps.records.invalidate(record_key))

    def forget(self, *keys: str) -> None:
        self.run(self.steps.forget(*keys))

    def lease(self, key: str) -> bool | None:
        return self.run(self.steps.leases.take(key))

    def end_lease(self, key: str) -> None:
        self.run(self.steps.leases.end(key))

    def stash(self, stash_key: str, delta: int, *, within_int64: bool = False) -> int:
        return self.run(self.steps.stashes.stash(stash_key, delta, within_int64=within_int64))

    def take_stash(self, stash_key: str, token: str, deadline: float, *, look: bool = False) -> int:
        return self.run(self.steps.stashes.take_stash(stash_key, token, deadline, look=look))

    def settle_fold(self, stash_key: str, token: str, *, put_back: bool) -> bool:
        return self.run(self.steps.stashes.settle_fold(stash_key, token, put_back=put_back))

    def peek_stash(self, stash_key: str) -> int:
        return self.run(self.steps.stashes.peek_stash(stash_key))

    def peek_stashes(self, stash_keys: Sequence[str]) -> dict[str, int]:
        return self.run(self.steps.stashes.peek_stashes(stash_keys))

    def make_unsure(
        self, stash_key: str, token: str, amount: int, shard: int, *, folded: int = 0
    ) -> None:
        self.run(self.steps.unsure.make_unsure(stash_key, token, amount, shard, folded=folded))

    def claim_unsure(
        self, stash_key: str, claim: str, deadline: float
    ) -> tuple[Stash, dict[str, Unsure]]:
        return self.run(self.steps.unsure.claim_unsure(stash_key, claim, deadline))

    def finish_unsure(self, stash_key: str, token: str, claim: str, *, written: bool) -> None:
        self.run(self.steps.unsure.finish_unsure(stash_key, token, claim, written=written))

    def unsure_to_pending(self, stash_key: str, token: str, claim: str, amount: int) -> None:
        self.run(self.steps.unsure.unsure_to_pending(stash_key, token, claim, amount))

    def unsure_seen(self, stash_key: str) -> bool:
        return self.steps.unsure_seen(stash_key)

    def wait_out_set(self, stash_key: str, cap: float) -> None:
        self.run(self.steps.sets.wait_out_set(stash_key, cap))

    def begin_set(self, stash_key: str, token: str, deadline: float) -> Stash:
        return self.run(self.steps.sets.begin_set(stash_key, token, deadline))

    def end_set(self, stash_key: str, token: str, *, landed: bool) -> None:
        self.run(self.steps.sets.end_set(stash_key, token, landed=landed))
