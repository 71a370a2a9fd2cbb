"""The bounded counter's Datastore side: escrow shares on the shards, and its bounds.

A bounded counter's shards are ``CounterShard`` entities like any counter's
(so reads, the cache and ``get_count(nocache=True)`` treat it as one), with
two more unindexed integers: ``cap`` and ``floor``, the shard's shares of the
bounds (``core/escrow.py`` says why they keep the total within them). Its
bounds and shard count live in one ``CounterBounds`` entity, named as shard 0
is. Every write here is one transaction that reads what it writes, so Datastore
serializes it against every other write of those shards; the decisions are
the pure functions of ``core/escrow.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import Any

from google.cloud.datastore_v1.types import entity as entity_types

from ..core import escrow
from ..core.effects import Steps
from ..core.escrow import Bounds, Share
from ..core.keys import shard_key_name
from ..core.record import ShardState
from . import entities, rpc
from .keyed import KeyedShardStore
from .shards import ShardStore

BOUNDS_KIND = "CounterBounds"
_CAP, _FLOOR = "cap", "floor"
_MAX_SHARDS = 400  # every shard and the bounds in one commit, with room to spare


@dataclasses.dataclass(frozen=True)
class Stored:
    """A bounded counter's bounds and shard count, as its ``CounterBounds`` entity holds them."""

    bounds: Bounds
    shards: int


class Short(Exception):
    """The shards this write read lack the room for its delta (internal signal):
    nothing was written."""


class OutOfBounds(Exception):
    """The counter's total is outside the bounds asked for (internal signal)."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.total = total


class FieldOverflow(Exception):
    """A count, cap or floor would leave the signed 64-bit range (internal signal)."""


class EscrowStore:
    """Bounded counters' shards and bounds, on top of one ``ShardStore``."""

    def __init__(self, store: ShardStore, keyed: KeyedShardStore) -> None:
        self.store = store
        self.keyed = keyed

    def bounds_key(self, name: str) -> Any:
        return self.store.key_for(shard_key_name(name, 0), BOUNDS_KIND)

    # -- reading -------------------------------------------------------------------

    def stored(self, name: str) -> Stored | None:
        """The counter's stored bounds, or None when it was never set up as bounded."""
        return self.store.run(self.stored_steps(name))

    def stored_steps(self, name: str) -> Steps[Stored | None]:
        """``stored``, as steps (for either shell)."""
        found, _, _ = yield from self.store.lookup([self.bounds_key(name)])
        return _stored_of(next(iter(found.values()), None))

    def snapshot(self, name: str, shards: int) -> tuple[Stored | None, list[Share]]:
        """The bounds and every share, as of one moment: read in one read-only
        transaction, so a borrow between two shards is seen wholly or not at all."""
        store = self.store
        request = rpc.BeginTransactionRequest(**store.base)
        request.transaction_options.read_only.SetInParent()
        transaction = bytes(store.rpc.begin_transaction(request).transaction)
        keys = [self.bounds_key(name), *(store.key(name, i) for i in range(shards))]
        found, _, _ = store.run(store.lookup(keys, transaction=transaction))
        stored = _stored_of(found.get(keys[0].SerializeToString()))
        if stored is not None and stored.shards > shards:
            more = [store.key(name, i) for i in range(shards, stored.shards)]
            found.update(store.run(store.lookup(more, transaction=transaction))[0])
            keys += more
        store.run(store.quiet_rollback(transaction))
        return stored, [
            _share_of(i, found.get(k.SerializeToString())) for i, k in enumerate(keys[1:])
        ]

    # -- the write paths ---------------------------------------------------------------

    def borrow(
        self,
        name: str,
        taker: int,
        lenders: Sequence[int],
        delta: int,
        *,
        lazy_begin: bool,
        token: str = "",
        pinned: Collection[str] = (),
        key: tuple[str, float] | None = None,
    ) -> list[ShardState | None]:
        """Add ``delta`` to shard ``taker``, in one transaction: the states written, the
        taker's first.

        With no ``lenders`` it must fit the taker's own share. With lenders, their
        room and the taker's are pooled, and what is left after ``delta`` is dealt
        out evenly again. Raises ``Short`` (nothing written) when the room is
        lacking (for a borrow: the snapshot that chose the lenders is stale now).

        A write whose ``token`` the taker holds already landed: nothing is
        written, and the taker is returned as it is. ``pinned`` tokens stay in
        this process's slot. With ``key`` (an idempotency key and its record's
        time to live) the key's record is read and inserted in the same
        transaction; ``[None]`` is returned when it exists (applied already).
        """
        store = self.store
        indexes = [taker, *lenders]
        shard_keys = [store.key(name, i) for i in indexes]
        record_key = self.keyed.record_key(name, key[0]) if key is not None else None
        # In index order: on the pessimistic engine two borrows that lock the same
        # shards in opposite orders would each wait for the other until a lock timeout.
        by_index = sorted(zip(indexes, shard_keys, strict=True), key=lambda pair: pair[0])
        reading = [k for _, k in by_index] + ([record_key] if record_key is not None else [])
        transaction = None if lazy_begin else store.run(store.begin())
        try:
            found, versions, begun = store.run(
                store.lookup(reading, transaction=transaction, begin=lazy_begin)
            )
            transaction = transaction or begun
            read = [found.get(k.SerializeToString()) for k in shard_keys]
            shares = [_share_of(i, e) for i, e in zip(indexes, read, strict=True)]
            applied = record_key is not None and record_key.SerializeToString() in found
            if applied or (token and token in entities.tokens_of(read[0])):
                if transaction is not None:
                    store.run(store.quiet_rollback(transaction))
                if applied:
                    return [None]
                taker_key = shard_keys[0].SerializeToString()
                return [ShardState(f"i{taker}", versions[taker_key], shares[0].count)]
            after = escrow.rebalanced(shares, taker, delta) if lenders else _alone(shares[0], delta)
            if after is None:
                raise Short()
            if not all(s.fields_fit_int64() for s in after):
                raise FieldOverflow()
            mutations = []
            for share, shard_key, entity in zip(after, shard_keys, read, strict=True):
                written = _shard(shard_key, name, share)
                entities.carry_slots(
                    entity, written, token if share.index == taker else "", pinned=pinned
                )
                mutations.append(entities.upsert(written))
            if key is not None:
                mutations += self.keyed.inserts(name, {key[0]: delta}, key[1])
            response = store.run(store.commit(mutations, transaction))
        except BaseException:
            if transaction is not None:
                store.run(store.quiet_rollback(transaction))
            raise
        results = response.mutation_results
        return [ShardState(f"i{s.index}", results[n].version, s.count) for n, s in enumerate(after)]

    def lay_out(
        self,
        name: str,
        shards: int,
        bounds: Bounds,
        *,
        value: int | None = None,
        lazy_begin: bool,
        only_if_new: bool = False,
        keep_stored: bool = False,
    ) -> tuple[Stored, list[ShardState]]:
        """Write ``bounds`` and deal the total (or ``value``) and each bound's room evenly
        over ``shards`` shards, in one transaction over every shard of the counter
        (any it had beyond ``shards``, or of another writer, are emptied into them).

        Raises ``OutOfBounds`` (nothing written) when the total is outside the
        bounds. With ``only_if_new`` it writes only when the counter has no bounds
        yet, and returns the stored ones (and no states) when it has. With
        ``keep_stored`` (setting the total) the stored bounds and shard count win
        over ``bounds`` and ``shards``, read in the same transaction.
        """
        if shards > _MAX_SHARDS:
            raise ValueError(f"a bounded counter has at most {_MAX_SHARDS} shards, not {shards}")
        store = self.store
        existing = store.run(store.shard_keys(name))
        keys = {k.SerializeToString(): k for k in existing}
        for index in range(shards):
            key = store.key(name, index)
            keys[key.SerializeToString()] = key
        ordered = [self.bounds_key(name), *keys.values()]
        transaction = None if lazy_begin else store.run(store.begin())
        try:
            found, _, begun = store.run(
                store.lookup(ordered, transaction=transaction, begin=lazy_begin)
            )
            transaction = transaction or begun
            stored = _stored_of(found.get(ordered[0].SerializeToString()))
            if only_if_new and stored is not None:
                if transaction is not None:
                    store.run(store.quiet_rollback(transaction))
                return stored, []
            if keep_stored and stored is not None:
                bounds, shards = stored.bounds, stored.shards
                missing = [store.key(name, i) for i in range(shards)]
                missing = [k for k in missing if k.SerializeToString() not in keys]
                if missing:  # never written, so not found by the query: read them too
                    found.update(store.run(store.lookup(missing, transaction=transaction))[0])
                    ordered += missing
            read = [found.get(k.SerializeToString()) for k in ordered[1:]]
            total = sum(entities.count_of(e) for e in read if e is not None)
            target = total if value is None else value
            if not bounds.contains(target):
                raise OutOfBounds(target)
            layout = {s.index: s for s in escrow.laid_out(target, shards, bounds)}
            mutations = [entities.upsert(_bounds_entity(ordered[0], name, bounds, shards))]
            written_shares: list[tuple[str, Share]] = []
            for shard_key, entity in zip(ordered[1:], read, strict=True):
                shard_id = entities.shard_id(name, shard_key.path[-1].name)
                index = int(shard_id[1:]) if shard_id.startswith("i") else -1
                # Emptied, with no room: a shard outside the layout takes nothing without borrowing.
                share = layout.get(index) or Share(index, 0, 0, 0)
                if not share.fields_fit_int64():
                    raise FieldOverflow()
                written = _shard(shard_key, name, share)
                entities.carry_slots(entity, written, "")
                mutations.append(entities.upsert(written))
                written_shares.append((shard_id, share))
            response = store.run(store.commit(mutations, transaction))
        except BaseException:
            if transaction is not None:
                store.run(store.quiet_rollback(transaction))
            raise
        results = response.mutation_results[1:]
        states = [
            ShardState(shard_id, result.version, share.count)
            for (shard_id, share), result in zip(written_shares, results, strict=True)
        ]
        return Stored(bounds, shards), states

    def forget(self, name: str) -> None:
        """Delete the bounds entity (the shards go with ``ShardStore.delete_all``)."""
        self.store.run(self.store.commit([entities.delete(self.bounds_key(name))]))


def _alone(share: Share, delta: int) -> list[Share] | None:
    added = escrow.adding(share, delta)
    return None if added is None else [added]


def _share_of(index: int, entity: Any) -> Share:
    """A shard as escrow sees it, from the shard alone (never from bounds a process
    remembers, which another may have changed since): a ``cap`` or ``floor`` that is
    null is no bound on that side; one that is missing (a shard not laid out, or
    written by a plain ``Counter``) leaves no room on that side."""
    count = entities.count_of(entity) if entity is not None else 0
    return Share(
        index=index,
        count=count,
        cap=_share_property(entity, _CAP, count),
        floor=_share_property(entity, _FLOOR, count),
    )


def _share_property(entity: Any, name: str, count: int) -> int | None:
    value = entity.properties.get(name) if entity is not None else None
    if value is None:
        return count
    kind = value.WhichOneof("value_type")
    if kind == "null_value":
        return None
    return int(value.integer_value) if kind == "integer_value" else count


def _shard(key: Any, name: str, share: Share) -> Any:
    written = entities.shard_entity(key, name, share.count)
    for prop, amount in ((_CAP, share.cap), (_FLOOR, share.floor)):
        value = written.properties[prop]
        if amount is None:
            value.null_value = 0  # laid out with no bound on this side
        else:
            value.integer_value = amount
        value.exclude_from_indexes = True
    return written


def _bounds_entity(key: Any, name: str, bounds: Bounds, shards: int) -> Any:
    entity = entity_types.Entity.pb()()
    entity.key.CopyFrom(key)
    props = entity.properties
    props["name"].string_value = name
    for prop, amount in (("minimum", bounds.minimum), ("maximum", bounds.maximum)):
        if amount is None:
            props[prop].null_value = 0
        else:
            props[prop].integer_value = amount
    props["shards"].integer_value = shards
    for prop in ("name", "minimum", "maximum", "shards"):
        props[prop].exclude_from_indexes = True
    return entity


def _stored_of(entity: Any) -> Stored | None:
    if entity is None:
        return None
    props = entity.properties

    def bound(prop: str) -> int | None:
        value = props.get(prop)
        if value is None or value.WhichOneof("value_type") != "integer_value":
            return None
        return int(value.integer_value)

    return Stored(Bounds(bound("minimum"), bound("maximum")), bound("shards") or 1)
