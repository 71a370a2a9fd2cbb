"""The shard store: the key scheme, the two write paths, the sum, set and delete.

It speaks to Datastore through the client's low-level API because the
high-level one drops what we need: each entity's *version* (which makes the
cache merge order-free, see ``core/record.py``) and the results of property
transforms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import secrets
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from google.cloud import datastore
from google.cloud.datastore_v1.types import datastore as ds_types
from google.cloud.datastore_v1.types import entity as entity_types
from google.cloud.datastore_v1.types import query as query_types

from ..core.keys import SHARD_KIND, shard_index, shard_key_name
from ..core.record import ShardState
from ..core.tokens import fold_token, token_time
from ..core.validation import INT64_MAX
from . import rpc

_TRANSACTIONAL = ds_types.CommitRequest.Mode.TRANSACTIONAL
_NON_TRANSACTIONAL = ds_types.CommitRequest.Mode.NON_TRANSACTIONAL
_NOT_FINISHED = query_types.QueryResultBatch.MoreResultsType.NOT_FINISHED
_EntityPb = entity_types.Entity.pb()
_KeyPb = entity_types.Key.pb()
_MutationPb = ds_types.Mutation.pb()
_QueryPb = query_types.Query.pb()
_EQUAL = query_types.PropertyFilter.Operator.EQUAL
_IN = query_types.PropertyFilter.Operator.IN
_MAX_MUTATIONS = 500  # Datastore's limit per commit
_IN_LIMIT = 30  # values one IN filter may hold
# Every write names itself with a token, which the shard keeps, so a retry after an
# unknown outcome (or the resolution of an unsure write) can tell whether it landed.
# Each process keeps its tokens in a property of its own, "w_" + one of 2**32 slots
# drawn per process: other processes' writes to the shard never push them out (unless
# two processes drew the same slot). A transaction write appends to its slot's list
# (the last _SLOT_TOKENS_KEPT); a transform cannot read the shard, so it replaces the
# slot with its one token, and only goes to a shard no other writer of this process
# holds (see paths/picker.py). A transaction write drops slots whose newest token is older
# than _SLOT_TTL, so a shard does not collect a slot for every process that ever ran.
_SLOT_PREFIX = "w_"
_SLOT_TOKENS_KEPT = 8
_SLOT_TTL = 86400
_LEGACY_TOKENS = "w"  # earlier versions kept the last 16 tokens of any process here
# The fence: tokens of writes that someone else settled while they were in flight,
# written onto every shard in one transaction. A ``count = v`` fences the writes it
# replaced (folds of delayed_incr, unsure writes; see core/stash.py): such a write finds
# its token and writes nothing. A resolution that wrote the delayed_incr part of a
# vanished writer's fold fences that part's fold token (core/tokens.py): the writer, if it
# wakes, writes only its own delta. Every transaction write carries the fence over,
# minus tokens over _SLOT_TTL old, keeping the newest _FENCE_KEPT.
_FENCE = "fence"
_FENCE_KEPT = 256


def _draw_slot() -> str:
    return secrets.token_hex(4)


_process_slot = _draw_slot()


def _new_slot_after_fork() -> None:
    global _process_slot
    _process_slot = _draw_slot()


os.register_at_fork(after_in_child=_new_slot_after_fork)


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


def _shard_id(name: str, key_name: str) -> str:
    index = shard_index(name, key_name)
    if index is not None:
        return f"i{index}"
    return "k" + hashlib.blake2b(key_name.encode("utf-8"), digest_size=6).hexdigest()


class ShardStore:
    """CounterShard entities of one Datastore project, database and namespace."""

    def __init__(self, client: datastore.Client, *, rpc_timeout: float) -> None:
        self.client = client
        self.rpc = rpc.DatastoreRpc(client, timeout=rpc_timeout)
        # Every request names the project and database.
        self.base: dict[str, Any] = {
            "project_id": client.project,
            "database_id": client.database or "",
        }
        self.partition = entity_types.PartitionId.pb()(
            project_id=client.project,
            database_id=client.database or "",
            namespace_id=client.namespace or "",
        )

    @property
    def scope(self) -> str:
        """Names where these shards live, so cache keys of two scopes never meet."""
        p = self.partition
        return f"{p.project_id}/{p.database_id}/{p.namespace_id}"

    # -- keys and entities ------------------------------------------------

    def key(self, name: str, index: int) -> Any:
        return self.key_for(shard_key_name(name, index))

    def key_for(self, key_name: str, kind: str = SHARD_KIND) -> Any:
        key = _KeyPb()
        key.partition_id.CopyFrom(self.partition)
        element = key.path.add()
        element.kind = kind
        element.name = key_name
        return key

    @staticmethod
    def shard_entity(key: Any, name: str, count: int) -> Any:
        entity = _EntityPb()
        entity.key.CopyFrom(key)
        entity.properties["name"].string_value = name
        count_value = entity.properties["count"]
        count_value.integer_value = count
        # Nobody queries by count; leaving it out of the index makes each write cheaper.
        count_value.exclude_from_indexes = True
        return entity

    @staticmethod
    def _tokens_of(entity: Any) -> list[str]:
        """Every write token a shard remembers, in every process's slot."""
        if entity is None:
            return []
        tokens: list[str] = []
        for prop, value in entity.properties.items():
            if prop.startswith(_SLOT_PREFIX) or prop in (_LEGACY_TOKENS, _FENCE):
                tokens += _slot_tokens(value)
        return tokens

    @staticmethod
    def count_of(entity: Any) -> int:
        value = entity.properties.get("count")
        if value is None or value.WhichOneof("value_type") != "integer_value":
            return 0
        return int(value.integer_value)

    # -- low-level calls ------------------------------------------------------
    # Raw protobuf requests through DatastoreRpc (see store/rpc.py): each call is bounded
    # by rpc_timeout and retried only by our policy (store/retry.py).

    def begin(self) -> bytes:
        request = rpc.BeginTransactionRequest(**self.base)
        request.transaction_options.read_write.SetInParent()
        return bytes(self.rpc.begin_transaction(request).transaction)

    def rollback(self, transaction: bytes) -> None:
        self.rpc.rollback(rpc.RollbackRequest(transaction=transaction, **self.base))

    def lookup(
        self, keys: Sequence[Any], *, transaction: bytes | None = None, begin: bool = False
    ) -> tuple[dict[bytes, Any], dict[bytes, int], bytes | None]:
        """Found entities and versions by serialized key, and the transaction begun, if any."""
        request = rpc.LookupRequest(keys=keys, **self.base)
        if transaction is not None:
            request.read_options.transaction = transaction
        elif begin:
            request.read_options.new_transaction.read_write.SetInParent()
        response = self.rpc.lookup(request)
        found: dict[bytes, Any] = {}
        versions: dict[bytes, int] = {}
        for result in response.found:
            serialized = result.entity.key.SerializeToString()
            found[serialized] = result.entity
            versions[serialized] = result.version
        for result in response.missing:
            versions[result.entity.key.SerializeToString()] = 0
        if response.deferred:
            # Only happens for large batches; fetch the rest the same way.
            more_found, more_versions, _ = self.lookup(
                list(response.deferred), transaction=transaction or response.transaction or None
            )
            found.update(more_found)
            versions.update(more_versions)
        return found, versions, (bytes(response.transaction) or None) if begin else None

    def commit(self, mutations: Sequence[Any], transaction: bytes | None = None) -> Any:
        """Commit Mutation protobufs, in ``transaction`` or on their own."""
        request = rpc.CommitRequest(mutations=mutations, **self.base)
        if transaction is None:
            request.mode = _NON_TRANSACTIONAL
        else:
            request.mode = _TRANSACTIONAL
            request.transaction = transaction
        return self.rpc.commit(request)

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
    ) -> ShardState:
        """Read the shard, add ``delta``, write it back, all in one transaction.

        ``lazy_begin`` starts the transaction with the read, one round trip
        fewer, where the backend supports it. Raises ``ShardOverflow`` (after
        rolling back) when the shard would leave ``[-limit - 1, limit]``.

        ``token`` names this increment. The shard keeps it in this process's
        token slot (see above), so a retry after a failure whose outcome is
        unknown (the reply was lost, but the commit may have landed) finds its
        own token and writes nothing. Transaction isolation makes that check
        sound: a first attempt that lands after the retry read the shard
        conflicts with it. Tokens in ``pinned`` stay in the slot however many
        writes come after them (see paths/picker.py). ``folded`` is the part of
        ``delta`` taken from delayed_incr: if a resolution wrote that part
        already (see ``_left_to_write``), only the rest is added.
        """
        key = self.key(name, index)
        transaction = None if lazy_begin else self.begin()
        try:
            found, versions, begun = self.lookup([key], transaction=transaction, begin=lazy_begin)
            transaction = transaction or begun
            serialized = key.SerializeToString()
            entity = found.get(serialized)
            current = self.count_of(entity) if entity is not None else 0
            if token:
                seen, fence = self._tokens_of(entity), _fence_tokens(entity)
                if entity is None and index:
                    fence = self._fence_of(name, transaction)
                    seen = fence
                left = _left_to_write(token, delta, folded, seen, fence)
                if left is None:
                    if transaction is not None:
                        self.quiet_rollback(transaction)
                    return ShardState(f"i{index}", versions[serialized], current)
                delta = left
            new = current + delta
            # Past the limit only towards zero: a shard pushed over it must still shrink.
            if not (within(new, INT64_MAX) and (within(new, limit) or abs(new) <= abs(current))):
                raise ShardOverflow(index, delta)
            written = self.shard_entity(key, name, new)
            carry_slots(entity, written, token, pinned=pinned)
            response = self.commit([_upsert(written)], transaction)
        except BaseException:
            if transaction is not None:
                self.quiet_rollback(transaction)
            raise
        return ShardState(f"i{index}", response.mutation_results[0].version, new)

    def _fence_of(self, name: str, transaction: bytes | None) -> list[str]:
        """The fence on shard 0, which every fencing write covers: a shard that does not
        exist yet may be one that write did not know of (its process had fewer shards)."""
        found, _, _ = self.lookup([self.key(name, 0)], transaction=transaction)
        return [t for e in found.values() for t in _fence_tokens(e)]

    def add_with_transform(
        self, name: str, index: int, delta: int, *, token: str = ""
    ) -> ShardState:
        """One commit, no read: upsert ``name`` only and let the server add ``delta`` to count.

        Only for backends that apply property transforms (Firestore in
        Datastore mode); see ``probe_transforms``. ``token`` goes in this
        process's token slot on the shard, so a retry can tell whether this
        landed unless this process, or one that drew the same slot, wrote the
        shard in between (the caller keeps its own writers off it meanwhile).
        """
        mutation = increment_mutation(self.key(name, index), name, delta)
        if token:
            slot = _SLOT_PREFIX + _process_slot
            value = mutation.upsert.properties[slot]
            value.string_value = token
            value.exclude_from_indexes = True
            mutation.property_mask.paths.append(slot)
        result = self.commit([mutation]).mutation_results[0]
        if len(result.transform_results) != 1:
            raise RuntimeError("the backend ignored the increment transform")
        value = int(result.transform_results[0].integer_value)
        return ShardState(f"i{index}", result.version, value)

    def quiet_rollback(self, transaction: bytes) -> None:
        # Releasing locks early helps the pessimistic engine; failing to is harmless
        # (the transaction expires), so it must not hide the original error.
        with contextlib.suppress(Exception):
            self.rollback(transaction)

    def probe_transforms(self) -> bool:
        """Does this backend apply increment transforms?

        The classic emulator silently ignores transforms and the mask and
        overwrites the entity, so this writes only a scratch entity of its own kind.
        """
        key = self.key_for(f"probe-{random.getrandbits(64):016x}", kind="ShardedCounterProbe")
        entity = self.shard_entity(key, "probe", 1)
        self.commit([_upsert(entity)])
        try:
            result = self.commit([increment_mutation(key, "probe", 1)]).mutation_results[0]
            reported = [int(r.integer_value) for r in result.transform_results]
            found, _, _ = self.lookup([key])
            stored = found.get(key.SerializeToString())
            return reported == [2] and stored is not None and self.count_of(stored) == 2
        finally:
            self.commit([_delete(key)])

    # -- reading, setting, deleting --------------------------------------------

    def _query_shards(self, name: str, *, keys_only: bool = False) -> Iterator[Any]:
        """Every CounterShard whose name is ``name``, whatever its key: EntityResult pbs."""
        return self._run_query(_EQUAL, [name], keys_only=keys_only)

    def _run_query(
        self, op: int, names: Sequence[str], *, keys_only: bool = False
    ) -> Iterator[Any]:
        """CounterShard entities whose name is ``op`` (EQUAL: the one name, IN: any of them)."""
        request = rpc.RunQueryRequest(partition_id=self.partition, **self.base)
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
        while True:
            batch = self.rpc.run_query(request).batch
            yield from batch.entity_results
            if batch.more_results != _NOT_FINISHED or not batch.entity_results:
                return
            query.start_cursor = batch.end_cursor

    def snapshot(self, name: str) -> Snapshot:
        return Snapshot(tuple(self._state_of(name, r) for r in self._query_shards(name)))

    def _state_of(self, name: str, result: Any) -> ShardState:
        key_name = result.entity.key.path[-1].name
        return ShardState(_shard_id(name, key_name), result.version, self.count_of(result.entity))

    def snapshots(self, names: Sequence[str], *, use_in: bool) -> dict[str, Snapshot]:
        """Every shard of each of ``names``.

        With ``use_in`` (Firestore in Datastore mode) it is one query per
        ``_IN_LIMIT`` names; the classic emulator refuses IN filters, so there
        it is one query per name, run side by side.
        """
        unique = list(dict.fromkeys(names))
        if not unique:
            return {}
        if not use_in:
            with ThreadPoolExecutor(max_workers=min(8, len(unique))) as pool:
                return dict(zip(unique, pool.map(self.snapshot, unique), strict=True))
        states: dict[str, list[ShardState]] = {name: [] for name in unique}
        for start in range(0, len(unique), _IN_LIMIT):
            for result in self._run_query(_IN, unique[start : start + _IN_LIMIT]):
                name = result.entity.properties["name"].string_value
                states[name].append(self._state_of(name, result))
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
    ) -> list[ShardState]:
        """Spread ``target(current total)`` plus ``adding`` evenly over the shards of
        ``name``, in one transaction.

        ``target`` returning a constant sets the counter; the default, the
        total itself, rebalances it (and adds ``adding``). Every shard is read
        inside the transaction, so any increment that commits concurrently
        conflicts with it: each increment lands wholly before (and is counted in
        the total read) or wholly after. Every shard keeps its write tokens;
        ``fence`` adds tokens to every shard's fence (see above).

        With ``token``, nothing is written if a shard holds it already (the
        shards are returned as they are), and ``folded`` of ``adding`` is left
        out if a resolution wrote it already (see ``_left_to_write``). The token
        goes in this process's slot, unless the write fences: a set's token is
        in its own fence, and a resolution of a fold part must not look like the
        write it stands in for.
        """
        foreign = [r.entity.key for r in self._query_shards(name, keys_only=True)]
        keys = {k.SerializeToString(): k for k in foreign}
        for index in range(shards):
            key = self.key(name, index)
            keys[key.SerializeToString()] = key
        if len(keys) > _MAX_MUTATIONS:
            raise ValueError(f"counter {name!r} has more than {_MAX_MUTATIONS} shards to set")
        transaction = None if lazy_begin else self.begin()
        try:
            found, versions, begun = self.lookup(
                list(keys.values()), transaction=transaction, begin=lazy_begin
            )
            transaction = transaction or begun
            ordered = list(keys.values())
            entities = [found.get(k.SerializeToString()) for k in ordered]
            # One fence for all: a fence must be on every shard, whichever one a
            # fenced write goes to.
            existing = [t for e in entities for t in _fence_tokens(e)]
            fenced = [*fence, *existing]
            left: int | None = adding
            if token:
                seen = [t for e in entities for t in self._tokens_of(e)]
                left = _left_to_write(token, adding, folded, seen, existing)
            if left is None:
                if transaction is not None:
                    self.quiet_rollback(transaction)
                return [
                    ShardState(
                        _shard_id(name, key.path[-1].name),
                        versions[key.SerializeToString()],
                        self.count_of(entity) if entity is not None else 0,
                    )
                    for key, entity in zip(ordered, entities, strict=True)
                ]
            total = sum(self.count_of(e) for e in found.values())
            amounts = spread(target(total) + left, len(ordered), limit)
            slot_token = "" if fence else token
            mutations = []
            for key, entity, amount in zip(ordered, entities, amounts, strict=True):
                written = self.shard_entity(key, name, amount)
                carry_slots(entity, written, slot_token, fence=fenced, pinned=pinned)
                mutations.append(_upsert(written))
            response = self.commit(mutations, transaction)
        except BaseException:
            if transaction is not None:
                self.quiet_rollback(transaction)
            raise
        return [
            ShardState(_shard_id(name, key.path[-1].name), result.version, amount)
            for key, amount, result in zip(ordered, amounts, response.mutation_results, strict=True)
        ]

    def delete_all(self, name: str) -> int:
        """Delete every shard of ``name``; returns how many there were."""
        keys = [r.entity.key for r in self._query_shards(name, keys_only=True)]
        for start in range(0, len(keys), _MAX_MUTATIONS):
            self.commit([_delete(k) for k in keys[start : start + _MAX_MUTATIONS]])
        return len(keys)


def spread(value: int, slots: int, limit: int = INT64_MAX) -> list[int]:
    """Split ``value`` evenly over ``slots`` shards, so each keeps the most headroom.

    Raises ValueError when a shard would leave ``[-limit - 1, limit]``.
    """
    base, extra = divmod(value, slots)
    amounts = [base + 1 if i < extra else base for i in range(slots)]
    if not all(within(a, limit) for a in amounts):
        raise ValueError(f"{value} does not fit in {slots} shards of at most {limit} each")
    return amounts


def mutation() -> Any:
    """An empty Mutation protobuf."""
    return _MutationPb()


def _upsert(entity: Any) -> Any:
    upsert = _MutationPb()
    upsert.upsert.CopyFrom(entity)
    return upsert


def _delete(key: Any) -> Any:
    delete = _MutationPb()
    delete.delete.CopyFrom(key)
    return delete


def increment_mutation(key: Any, name: str, delta: int) -> Any:
    """An upsert that sets only ``name`` and has the server add ``delta`` to ``count``."""
    increment = _MutationPb()
    entity = increment.upsert
    entity.key.CopyFrom(key)
    entity.properties["name"].string_value = name
    increment.property_mask.paths.append("name")
    transform = increment.property_transforms.add()
    transform.property = "count"
    transform.increment.integer_value = delta
    return increment


def _left_to_write(
    token: str, amount: int, folded: int, tokens: Collection[str], fence: Collection[str]
) -> int | None:
    """What the write ``token`` of ``amount`` (``folded`` of it taken from delayed_incr)
    still adds, given the tokens of the shards it read and their fence; None for nothing.

    Its token in a slot: it landed. In the fence: a set replaced it. Its fold token in
    the fence: a resolution wrote the folded part in its place (see core/stash.py), so only
    the rest is left.
    """
    if token in tokens:
        return None
    if folded and fold_token(token) in fence:
        return (amount - folded) or None
    return amount


def _fence_tokens(entity: Any) -> list[str]:
    return _slot_tokens(entity.properties.get(_FENCE)) if entity is not None else []


def _slot_tokens(value: Any) -> list[str]:
    """The tokens in one slot (or the fence): a list, or one string (a transform)."""
    if value is None:
        return []
    kind = value.WhichOneof("value_type")
    if kind == "array_value":
        return [v.string_value for v in value.array_value.values]
    return [value.string_value] if kind == "string_value" else []


def carry_slots(
    entity: Any,
    written: Any,
    token: str,
    *,
    fence: Sequence[str] = (),
    pinned: Collection[str] = (),
) -> None:
    """Give ``written`` the token slots of ``entity`` (the shard as read), this
    process's own with ``token`` appended (its last few, and any ``pinned``), and
    without slots gone stale; and the fence of ``entity`` (or ``fence`` in its
    place), without tokens gone stale."""
    own = _SLOT_PREFIX + _process_slot
    mine: list[str] = []
    stale_before = time.time() - _SLOT_TTL
    fenced = list(fence)
    if entity is not None:
        for prop, value in entity.properties.items():
            if prop == own:
                mine = _slot_tokens(value)
            elif prop == _FENCE:
                fenced = fenced or _slot_tokens(value)
            elif prop.startswith(_SLOT_PREFIX):
                times = [token_time(t) for t in _slot_tokens(value)]
                if times and all(t is not None and t < stale_before for t in times):
                    continue  # a process long gone; nobody can still be looking
                written.properties[prop].CopyFrom(value)
    if token:
        mine = [*mine, token]
        last = len(mine) - _SLOT_TOKENS_KEPT
        mine = [t for i, t in enumerate(mine) if i >= last or t in pinned]
    _put_tokens(written, own, mine)
    # Tokens start with their time, so sorting them keeps the newest last.
    fresh = {t for t in fenced if (token_time(t) or stale_before) >= stale_before}
    _put_tokens(written, _FENCE, sorted(fresh)[-_FENCE_KEPT:])


def _put_tokens(entity: Any, prop: str, tokens: Sequence[str]) -> None:
    if not tokens:
        return
    array = entity.properties[prop]  # an array is indexed per element, never as a whole
    for kept in tokens:
        item = array.array_value.values.add()
        item.string_value = kept
        item.exclude_from_indexes = True


def within(value: int, limit: int) -> bool:
    return -limit - 1 <= value <= limit
