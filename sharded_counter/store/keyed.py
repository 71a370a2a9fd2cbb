"""Idempotency keys: an increment delivered more than once counts once.

``counter.increment(n, idempotency_key="msg-123")`` writes, in the same
atomic commit as the shard, a *key record*: an entity of kind
``CounterIdempotencyKey`` named after the counter and the key (``core/keys.py``).
The record is inserted, never overwritten, so a second commit carrying the
same key fails with ``AlreadyExists`` and adds nothing. That makes every
question about a keyed increment one Datastore can answer by itself:

* a later delivery of the key (another thread, another process, after a
  restart or a memcache flush) finds the record and counts nothing;
* two deliveries at the same moment: one insert wins, the other is refused;
* a commit whose reply was lost is retried as it was: if it landed, the retry
  is refused with ``AlreadyExists`` and the key is known to be applied.

Nothing of a keyed increment lives in memcache alone: it is never stashed in
``delayed_incr`` (the record could not go with it), so when Datastore fails
the caller gets ``IncrementNotRecorded`` or ``IncrementOutcomeUnknown``, and
retrying with the same key is safe either way.

A record holds the counter's name, the key, the delta and ``expire_at``, the
time after which it may be deleted. In production a Firestore TTL policy on
``CounterIdempotencyKey.expire_at`` deletes records (Google deletes expired
documents typically within a day of ``expire_at``); where no TTL runs (the
emulators, or before the policy is made), ``purge_expired`` does. A record is
honoured until it is gone, so a key is remembered for at least
``idempotency_ttl`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any

from google.cloud.datastore_v1.types import entity as entity_types
from google.cloud.datastore_v1.types import query as query_types
from google.protobuf import timestamp_pb2

from ..core.bounds import within
from ..core.effects import Steps
from ..core.keys import IDEMPOTENCY_KIND, idempotency_record_name
from ..core.record import ShardState
from ..core.validation import INT64_MAX
from . import entities
from .shards import ShardOverflow, ShardStore, transformed

_MAX_MUTATIONS = 500  # Datastore's limit per commit; a group keeps room for the shard

#: The most keys one keyed write may carry. Each key record is an entity group of its
#: own, and the write is one transaction with its shard: the classic Datastore takes
#: at most 25 entity groups in a transaction (Firestore in Datastore mode, 500
#: entities). A bench run with groups of up to 499 keys, at 32 threads on the classic
#: emulator, had 9,536-16,409 increments per repeat refused with "operating on too
#: many entity groups in a single transaction".
MAX_KEYS_PER_WRITE = 24


class KeyedShardStore:
    """The keyed write paths and the key records, on top of one ``ShardStore``."""

    def __init__(self, store: ShardStore) -> None:
        self.store = store

    def record_key(self, name: str, key: str) -> Any:
        return self.store.key_for(idempotency_record_name(name, key), IDEMPOTENCY_KIND)

    def _record(self, name: str, key: str, delta: int, expire_at: float) -> Any:
        record = entity_types.Entity.pb()()
        record.key.CopyFrom(self.record_key(name, key))
        props = record.properties
        props["counter"].string_value = name
        props["key"].string_value = key
        props["delta"].integer_value = delta
        for unindexed in ("counter", "key", "delta"):
            props[unindexed].exclude_from_indexes = True
        # Indexed: purge_expired queries it where no TTL policy runs.
        props["expire_at"].timestamp_value.CopyFrom(_timestamp(expire_at))
        return record

    def inserts(self, name: str, keys: Mapping[str, int], ttl: float) -> list[Any]:
        """Insert mutations of the records of ``keys`` (``{key: delta}``), living ``ttl`` s."""
        expire_at = time.time() + ttl
        inserts = []
        for key, delta in keys.items():
            insert = entities.mutation()
            insert.insert.CopyFrom(self._record(name, key, delta, expire_at))
            inserts.append(insert)
        return inserts

    def add_with_transform(
        self, name: str, index: int, keys: Mapping[str, int], *, ttl: float
    ) -> Steps[ShardState]:
        """One commit in a single-use transaction: insert every key's record and have
        the server add their deltas to the shard. Raises ``AlreadyExists`` (nothing
        written) when any record exists already: see ``applied``."""
        store = self.store
        increment = entities.increment_mutation(store.key(name, index), name, sum(keys.values()))
        response = yield from store.commit(
            [*self.inserts(name, keys, ttl), increment], single_use=True
        )
        return transformed(index, response.mutation_results[-1])

    def add_in_transaction(
        self,
        name: str,
        index: int,
        keys: Mapping[str, int],
        *,
        ttl: float,
        lazy_begin: bool,
        limit: int = INT64_MAX,
    ) -> Steps[tuple[ShardState | None, set[str]]]:
        """Read the shard and the key records, add the deltas of the keys not applied
        yet and insert their records, all in one transaction.

        Returns the shard's new state (None when every key was applied already,
        and nothing was written) and the keys found applied. Raises ``ShardOverflow``
        (nothing written) when the shard would leave ``[-limit - 1, limit]``.
        """
        store = self.store
        shard_key = store.key(name, index)
        record_keys = {key: self.record_key(name, key) for key in keys}
        transaction = None if lazy_begin else (yield from store.begin())
        try:
            found, _, begun = yield from store.lookup(
                [shard_key, *record_keys.values()], transaction=transaction, begin=lazy_begin
            )
            transaction = transaction or begun
            applied = {k for k, rk in record_keys.items() if rk.SerializeToString() in found}
            left = {k: d for k, d in keys.items() if k not in applied}
            serialized = shard_key.SerializeToString()
            entity = found.get(serialized)
            current = entities.count_of(entity) if entity is not None else 0
            if not left:
                if transaction is not None:
                    yield from store.quiet_rollback(transaction)
                return None, applied
            new = current + sum(left.values())
            if not (within(new, INT64_MAX) and (within(new, limit) or abs(new) <= abs(current))):
                raise ShardOverflow(index, new - current)
            written = entities.shard_entity(shard_key, name, new)
            entities.carry_slots(entity, written, "")
            response = yield from store.commit(
                [entities.upsert(written), *self.inserts(name, left, ttl)], transaction
            )
        except BaseException:
            if transaction is not None:
                yield from store.quiet_rollback(transaction)
            raise
        return ShardState(f"i{index}", response.mutation_results[0].version, new), applied

    def applied(self, name: str, keys: Collection[str]) -> Steps[set[str]]:
        """Which of ``keys`` have a record on ``name`` (one strongly consistent lookup)."""
        record_keys = {key: self.record_key(name, key) for key in keys}
        found, _, _ = yield from self.store.lookup(list(record_keys.values()))
        return {k for k, rk in record_keys.items() if rk.SerializeToString() in found}

    def purge_expired(self, *, now: float | None = None) -> int:
        """Delete every key record whose ``expire_at`` has passed; returns how many.

        For backends where no TTL policy runs (the emulators, or a database whose
        policy is not set up yet). Any record of any counter in this namespace.
        """
        store = self.store
        request = store.query_request()
        query = request.query
        query.kind.add().name = IDEMPOTENCY_KIND
        expiry = query.filter.property_filter
        expiry.property.name = "expire_at"
        expiry.op = _LESS_THAN
        expiry.value.timestamp_value.CopyFrom(_timestamp(time.time() if now is None else now))
        query.projection.add().property.name = "__key__"
        doomed = [result.entity.key for result in store.run(store.run_query(request))]
        for start in range(0, len(doomed), _MAX_MUTATIONS):
            store.run(
                store.commit([entities.delete(k) for k in doomed[start : start + _MAX_MUTATIONS]])
            )
        return len(doomed)


_LESS_THAN = query_types.PropertyFilter.Operator.LESS_THAN


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
