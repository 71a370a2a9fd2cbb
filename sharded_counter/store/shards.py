"""The shard store: the two write paths, the sum, a set's rewrite, and delete.

It speaks to Datastore through raw calls (store/calls.py) because the
high-level client drops what we need: each entity's *version* (which makes
the cache merge order-free, see ``core/record.py``) and the results of
property transforms. The entities themselves are built in store/entities.py;
which tokens a write looks for and keeps is decided in core/tokens.py.

Every write names itself with a token, which the shard keeps, so a retry after
an unknown outcome (or the resolution of an unsure write) can tell whether it
landed. Each process keeps its tokens in a slot of its own: other processes'
writes to the shard never push them out (unless two processes drew the same
slot). A transaction write appends to its slot; a transform cannot read the
shard, so it replaces the slot with its one token, and only goes to a shard no
other writer of this process holds (see paths/picker.py). The *fence* holds
the tokens of writes that someone else settled while they were in flight,
written onto every shard in one transaction: a ``count = v`` fences the writes
it replaced (folds of delayed_incr, unsure writes; see core/stash.py), and a
resolution that wrote a vanished writer's fold part fences its fold token.
Every transaction write carries the fence over.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Collection, Sequence
from typing import Any

from google.cloud.datastore_v1.types import query as query_types

from ..core.bounds import spread, within
from ..core.effects import Steps, Together
from ..core.keys import SHARD_KIND, shard_key_name
from ..core.record import ShardState
from ..core.tokens import left_to_write
from ..core.validation import INT64_MAX
from . import entities
from .calls import DatastoreCalls

_EQUAL = query_types.PropertyFilter.Operator.EQUAL
_IN = query_types.PropertyFilter.Operator.IN
_MAX_MUTATIONS = 500  # Datastore's limit per commit
_IN_LIMIT = 30  # values one IN filter may hold


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Every shard of one counter as of one read."""

    states: tuple[ShardState, ...]

    @property
    def total(self) -> int:
        return sum(s.value for s in self.states)

    def indexes(self) -> set[int]:
        return {int(s.shard_id[1:]) for s in self.states if s.shard_id.startswith("i")}


class ShardOverflow(Exception):
    """This shard cannot take the delta without leaving int64 (internal signal).

    ``delta`` is what the write still had to add (less than asked when a resolution
    had written its fold part already)."""

    def __init__(self, index: int, delta: int) -> None:
        super().__init__(index, delta)
        self.delta = delta


class ShardStore(DatastoreCalls):
    """CounterShard entities of one Datastore project, database and namespace."""

    def key(self, name: str, index: int) -> Any:
        return self.key_for(shard_key_name(name, index), SHARD_KIND)

    # -- the write paths ------------------------------------------------------

    def add_in_transaction(
        self,
        name: str,
        index: int,
        delta: int,
        *,
        lazy_begin: bool,
        limit: int = INT64_MAX,
        token: str = "",
        folded: int = 0,
        pinned: Collection[str] = (),
    ) -> Steps[ShardState]:
        """Read the shard, add ``delta``, write it back, all in one transaction.

        ``lazy_begin`` starts the transaction with the read, one round trip
        fewer, where the backend supports it. Raises ``ShardOverflow`` (after
        rolling back) when the shard would leave ``[-limit - 1, limit]``.

        ``token`` names this increment. The shard keeps it in this process's
        token slot, so a retry after a failure whose outcome is unknown (the
        reply was lost, but the commit may have landed) finds its own token and
        writes nothing. Transaction isolation makes that check sound: a first
        attempt that lands after the retry read the shard conflicts with it.
        Tokens in ``pinned`` stay in the slot however many writes come after
        them (see paths/picker.py). ``folded`` is the part of ``delta`` taken
        from delayed_incr: if a resolution wrote that part already, only the
        rest is added (core/tokens.left_to_write).
        """
        key = self.key(name, index)
        transaction = None if lazy_begin else (yield from self.begin())
        try:
            found, versions, begun = yield from self.lookup(
                [key], transaction=transaction, begin=lazy_begin
            )
            transaction = transaction or begun
            serialized = key.SerializeToString()
            entity = found.get(serialized)
            current = entities.count_of(entity) if entity is not None else 0
            if token:
                seen, fence = entities.tokens_of(entity), entities.fence_tokens(entity)
                if entity is None and index:
                    fence = yield from self._fence_of(name, transaction)
                    seen = fence
                left = left_to_write(token, delta, folded, seen, fence)
                if left is None:
                    if transaction is not None:
                        yield from self.quiet_rollback(transaction)
                    return ShardState(f"i{index}", versions[serialized], current)
                delta = left
            new = current + delta
            # Past the limit only towards zero: a shard pushed over it must still shrink.
            if not (within(new, INT64_MAX) and (within(new, limit) or abs(new) <= abs(current))):
                raise ShardOverflow(index, delta)
            written = entities.shard_entity(key, name, new)
            entities.carry_slots(entity, written, token, pinned=pinned)
            response = yield from self.commit([entities.upsert(written)], transaction)
        except BaseException:
            if transaction is not None:
                yield from self.quiet_rollback(transaction)
            raise
        return ShardState(f"i{index}", response.mutation_results[0].version, new)

    def _fence_of(self, name: str, transaction: bytes | None) -> Steps[list[str]]:
        """The fence on shard 0, which every fencing write covers: a shard that does not
        exist yet may be one that write did not know of (its process had fewer shards)."""
        found, _, _ = yield from self.lookup([self.key(name, 0)], transaction=transaction)
        return [t for e in found.values() for t in entities.fence_tokens(e)]

    def add_with_transform(
        self, name: str, index: int, delta: int, *, token: str = "", transaction: bytes
    ) -> Steps[ShardState]:
        """One commit, no read: upsert ``name`` only and let the server add ``delta`` to count.

        Only for backends that apply property transforms (Firestore in
        Datastore mode); see ``probe_transforms``. ``token`` goes in this
        process's token slot on the shard, so a retry can tell whether this
        landed unless this process, or one that drew the same slot, wrote the
        shard in between (the caller keeps its own writers off it meanwhile).
        The commit is in ``transaction`` (begun for it, no reads): when its reply
        is lost, ``close`` on it settles whether it landed before anyone looks for
        the token (a commit with no transaction may land any time later).
        """
        increment = entities.increment_mutation(self.key(name, index), name, delta)
        if token:
            entities.with_slot_token(increment, token)
        response = yield from self.commit([increment], transaction)
        return transformed(index, response.mutation_results[0])

    def probe_transforms(self) -> Steps[bool]:
        """Does this backend apply increment transforms?

        The classic emulator silently ignores transforms and the mask and
        overwrites the entity, so this writes only a scratch entity of its own kind.
        """
        key = self.key_for(f"probe-{random.getrandbits(64):016x}", "ShardedCounterProbe")
        yield from self.commit([entities.upsert(entities.shard_entity(key, "probe", 1))])
        try:
            result = yield from self.commit([entities.increment_mutation(key, "probe", 1)])
            reported = [int(r.integer_value) for r in result.mutation_results[0].transform_results]
            found, _, _ = yield from self.lookup([key])
            stored = found.get(key.SerializeToString())
            return reported == [2] and stored is not None and entities.count_of(stored) == 2
        finally:
            yield from self.commit([entities.delete(key)])

    # -- reading, setting, deleting --------------------------------------------

    def _query_shards(
        self, op: int, names: Sequence[str], *, keys_only: bool = False
    ) -> Steps[list[Any]]:
        """CounterShard entities whose name is ``op`` (EQUAL: the one name, IN: any of them),
        whatever their keys: EntityResult pbs."""
        request = self.query_request()
        query = request.query
        query.kind.add().name = SHARD_KIND
        name_filter = query.filter.property_filter
        name_filter.property.name = "name"
        name_filter.op = op
        if op == _IN:
            for name in names:
                name_filter.value.array_value.values.add().string_value = name
        else:
            (name_filter.value.string_value,) = names
        if keys_only:
            query.projection.add().property.name = "__key__"
        results: list[Any] = yield from self.run_query(request)
        return results

    def snapshot(self, name: str) -> Steps[Snapshot]:
        results = yield from self._query_shards(_EQUAL, [name])
        return Snapshot(tuple(_state_of(name, r) for r in results))

    def snapshots(self, names: Sequence[str], *, use_in: bool) -> Steps[dict[str, Snapshot]]:
        """Every shard of each of ``names``.

        With ``use_in`` (Firestore in Datastore mode) it is one query per
        ``_IN_LIMIT`` names; the classic emulator refuses IN filters, so there
        it is one query per name, run side by side.
        """
        unique = list(dict.fromkeys(names))
        if not unique:
            return {}
        if not use_in:
            found: list[Snapshot] = yield Together([self.snapshot(name) for name in unique])
            return dict(zip(unique, found, strict=True))
        states: dict[str, list[ShardState]] = {name: [] for name in unique}
        for start in range(0, len(unique), _IN_LIMIT):
            results = yield from self._query_shards(_IN, unique[start : start + _IN_LIMIT])
            for result in results:
                name = result.entity.properties["name"].string_value
                states[name].append(_state_of(name, result))
        return {name: Snapshot(tuple(found)) for name, found in states.items()}

    def rewrite(
        self,
        name: str,
        shards: int,
        target: Callable[[int], int] = lambda total: total,
        *,
        lazy_begin: bool,
        limit: int = INT64_MAX,
        adding: int = 0,
        token: str = "",
        folded: int = 0,
        fence: Sequence[str] = (),
        pinned: Collection[str] = (),
    ) -> Steps[list[ShardState]]:
        """Spread ``target(current total)`` plus ``adding`` evenly over the shards of
        ``name``, in one transaction.

        ``target`` returning a constant sets the counter; the default, the
        total itself, rebalances it (and adds ``adding``). Every shard is read
        inside the transaction, so any increment that commits concurrently
        conflicts with it: each increment lands wholly before (and is counted in
        the total read) or wholly after. Every shard keeps its write tokens;
        ``fence`` adds tokens to every shard's fence.

        With ``token``, nothing is written if a shard holds it already (the
        shards are returned as they are), and ``folded`` of ``adding`` is left
        out if a resolution wrote it already. The token goes in this process's
        slot, unless the write fences: a set's token is in its own fence, and a
        resolution of a fold part must not look like the write it stands in for.
        """
        keys = {k.SerializeToString(): k for k in (yield from self.shard_keys(name))}
        for index in range(shards):
            key = self.key(name, index)
            keys[key.SerializeToString()] = key
        if len(keys) > _MAX_MUTATIONS:
            raise ValueError(f"counter {name!r} has more than {_MAX_MUTATIONS} shards to set")
        ordered = list(keys.values())
        transaction = None if lazy_begin else (yield from self.begin())
        try:
            found, versions, begun = yield from self.lookup(
                ordered, transaction=transaction, begin=lazy_begin
            )
            transaction = transaction or begun
            read = [found.get(k.SerializeToString()) for k in ordered]
            # One fence for all: a fence must be on every shard, whichever one a
            # fenced write goes to.
            existing = [t for e in read for t in entities.fence_tokens(e)]
            left: int | None = adding
            if token:
                seen = [t for e in read for t in entities.tokens_of(e)]
                left = left_to_write(token, adding, folded, seen, existing)
            if left is None:
                if transaction is not None:
                    yield from self.quiet_rollback(transaction)
                counts = [entities.count_of(e) if e is not None else 0 for e in read]
                versions_read = [versions[k.SerializeToString()] for k in ordered]
                return _states(name, ordered, versions_read, counts)
            total = sum(entities.count_of(e) for e in found.values())
            amounts = spread(target(total) + left, len(ordered), limit)
            slot_token = "" if fence else token
            mutations = []
            for key, entity, amount in zip(ordered, read, amounts, strict=True):
                written = entities.shard_entity(key, name, amount)
                entities.carry_slots(
                    entity, written, slot_token, fence=[*fence, *existing], pinned=pinned
                )
                mutations.append(entities.upsert(written))
            response = yield from self.commit(mutations, transaction)
        except BaseException:
            if transaction is not None:
                yield from self.quiet_rollback(transaction)
            raise
        versions_written = [r.version for r in response.mutation_results]
        return _states(name, ordered, versions_written, amounts)

    def shard_keys(self, name: str) -> Steps[list[Any]]:
        """The keys of every shard of ``name``, ours or not (a keys-only query)."""
        results = yield from self._query_shards(_EQUAL, [name], keys_only=True)
        return [r.entity.key for r in results]

    def delete_all(self, name: str) -> Steps[int]:
        """Delete every shard of ``name``; returns how many there were."""
        keys = yield from self.shard_keys(name)
        for start in range(0, len(keys), _MAX_MUTATIONS):
            yield from self.commit(
                [entities.delete(k) for k in keys[start : start + _MAX_MUTATIONS]]
            )
        return len(keys)


def transformed(index: int, result: Any) -> ShardState:
    """The shard state a commit's transform result reports (shard ``index``)."""
    if len(result.transform_results) != 1:
        raise RuntimeError("the backend ignored the increment transform")
    return ShardState(f"i{index}", result.version, int(result.transform_results[0].integer_value))


def _state_of(name: str, result: Any) -> ShardState:
    key_name = result.entity.key.path[-1].name
    return ShardState(
        entities.shard_id(name, key_name), result.version, entities.count_of(result.entity)
    )


def _states(
    name: str, keys: Sequence[Any], versions: Sequence[int], counts: Sequence[int]
) -> list[ShardState]:
    return [
        ShardState(entities.shard_id(name, key.path[-1].name), version, count)
        for key, version, count in zip(keys, versions, counts, strict=True)
    ]
