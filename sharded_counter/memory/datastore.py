"""Datastore as a model in memory, at the level of the requests our steps send.

``DatastoreModel`` answers the five calls of ``store/rpc.py`` (``lookup``,
``commit``, ``begin_transaction``, ``rollback``, ``run_query``) on the same
request and response protobufs, for the entities, mutations, transforms and
queries this package uses. It models the two engines our tests run on:

* ``"classic"``: optimistic. A transaction aborts at commit when an entity it
  read or writes was committed by someone else after the transaction began.
  Property transforms are ignored and the mask too: the upsert overwrites the
  entity, as the classic emulator does. A transaction touches at most 25
  entity groups.
* ``"firestore"``: Firestore in Datastore mode, pessimistic. A read in a
  transaction locks the entity; another transaction's read or a commit of it
  waits (``Blocked``) until the lock is free, and gives up with ``Aborted``
  ("Transaction lock timeout") after ``lock_timeout`` seconds. Transforms apply.
  A transaction nobody uses for ``idle_timeout`` seconds expires, its locks
  freed; naming it then is refused.

It keeps no time of its own: every call is given ``now`` (seconds). It raises the
``google.api_core`` exceptions the real service would, and never fails on its
own: lost replies, late commits and outages are the caller's to inject
(``tools/simulate``). What it does not model: indexes, eventual consistency,
entity groups with ancestors, ``read_time``, cursors (a query answers in one
batch), and ids allocated for incomplete keys.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud.datastore_v1.types import datastore as ds_types
from google.cloud.datastore_v1.types import query as query_types

from ..core.validation import INT64_MAX, INT64_MIN

LookupResponse = ds_types.LookupResponse.pb()
CommitResponse = ds_types.CommitResponse.pb()
BeginTransactionResponse = ds_types.BeginTransactionResponse.pb()
RollbackResponse = ds_types.RollbackResponse.pb()
RunQueryResponse = ds_types.RunQueryResponse.pb()

_TRANSACTIONAL = int(ds_types.CommitRequest.Mode.TRANSACTIONAL)
_EQUAL = int(query_types.PropertyFilter.Operator.EQUAL)
_IN = int(query_types.PropertyFilter.Operator.IN)
_LESS_THAN = int(query_types.PropertyFilter.Operator.LESS_THAN)
_NO_MORE_RESULTS = int(query_types.QueryResultBatch.MoreResultsType.NO_MORE_RESULTS)

#: Entity groups one classic transaction may touch.
CLASSIC_ENTITY_GROUPS = 25
#: Mutations one commit may carry (both engines).
MAX_MUTATIONS = 500

KeyId = tuple[str, str, str, tuple[tuple[str, str], ...]]


def key_id(key: Any) -> KeyId:
    """A key as a hashable value: its partition and path (kind and name or id)."""
    p = key.partition_id
    path = tuple((e.kind, e.name or f"#{e.id}") for e in key.path)
    return (p.project_id, p.database_id, p.namespace_id, path)


#: The Datastore calls this package makes, with their request and response types:
#: ``store/rpc.py`` and ``aio/rpc.py`` send them, and the model here answers them.
CALLS: dict[str, tuple[Any, Any]] = {
    "lookup": (ds_types.LookupRequest, ds_types.LookupResponse),
    "commit": (ds_types.CommitRequest, ds_types.CommitResponse),
    "begin_transaction": (ds_types.BeginTransactionRequest, ds_types.BeginTransactionResponse),
    "rollback": (ds_types.RollbackRequest, ds_types.RollbackResponse),
    "run_query": (ds_types.RunQueryRequest, ds_types.RunQueryResponse),
}


class Blocked(Exception):
    """The call waits for a lock another transaction holds: ask again later (the model
    changed nothing). ``holder`` is that transaction."""

    def __init__(self, holder: bytes) -> None:
        super().__init__(holder)
        self.holder = holder


@dataclasses.dataclass
class Stored:
    entity: Any  # an Entity protobuf
    version: int
    written_at: int  # the commit sequence number that wrote it


@dataclasses.dataclass
class Transaction:
    began_at: int  # the commit sequence number when it began
    last_used: float
    touched: set[KeyId] = dataclasses.field(default_factory=set)
    waiting_since: float | None = None  # a blocked call's first attempt


class DatastoreModel:
    """One Datastore database in memory (see the module docstring)."""

    def __init__(
        self, engine: str = "firestore", *, lock_timeout: float = 2.0, idle_timeout: float = 60.0
    ) -> None:
        if engine not in ("classic", "firestore"):
            raise ValueError(f"engine is 'classic' or 'firestore', not {engine!r}")
        self.engine = engine
        self.lock_timeout = lock_timeout
        self.idle_timeout = idle_timeout
        self.entities: dict[KeyId, Stored] = {}
        self._transactions: dict[bytes, Transaction] = {}
        self._locks: dict[KeyId, bytes] = {}  # firestore: entity -> the transaction holding it
        self._commits = 0  # commit sequence number; also every entity's version
        self._begun = 0  # transactions begun: they are named txn-1 to txn-<begun>
        self._deleted_at: dict[KeyId, int] = {}  # classic: when each entity was deleted
        #: Called with the written entities before and after (by key) after each commit.
        self.on_commit: list[
            Callable[[dict[KeyId, Stored | None], dict[KeyId, Stored | None]], None]
        ] = []
        #: Called with a transaction's id when it ends (committed, rolled back, expired):
        #: whoever waits for its locks may try again.
        self.on_end: list[Callable[[bytes], None]] = []

    @property
    def pessimistic(self) -> bool:
        return self.engine == "firestore"

    # -- the five calls --------------------------------------------------------------------

    def call(self, method: str, request: Any, now: float) -> Any:
        """Answer ``request`` (a ``store/rpc.py`` method's request protobuf) at ``now``."""
        self._expire(now)
        answer: Any = getattr(self, method)(request, now)
        return answer

    def begin_transaction(self, request: Any, now: float) -> Any:
        response = BeginTransactionResponse()
        response.transaction = self._begin(now)
        return response

    def rollback(self, request: Any, now: float) -> Any:
        # As the Firestore emulator answers: OK also for a transaction that ended
        # before (committed, rolled back, expired), which is what a fence asks
        # (paths/transforms.py); "Invalid transaction." for one it never began.
        txn = bytes(request.transaction)
        if txn not in self._transactions and not self.began(txn):
            raise google_error(gexc.InvalidArgument, "Invalid transaction.")
        self._end(txn)
        return RollbackResponse()

    def lookup(self, request: Any, now: float) -> Any:
        options = request.read_options
        which = options.WhichOneof("consistency_type")
        txn: bytes | None = None
        if which == "transaction":
            txn = self._known(bytes(options.transaction))
        keys = [key_id(k) for k in request.keys]
        if which == "new_transaction":
            if self.pessimistic:
                self._check_free(keys, None, now, waiter=None)
            txn = self._begin(now)
        if txn is not None:
            state = self._transactions[txn]
            if self.pessimistic:
                self._check_free(keys, txn, now, waiter=state)
                for k in keys:
                    self._locks[k] = txn
            state.touched.update(keys)
            state.last_used = now
            state.waiting_since = None
        response = LookupResponse()
        for pb, k in zip(request.keys, keys, strict=True):
            stored = self.entities.get(k)
            if stored is None:
                response.missing.add().entity.key.CopyFrom(pb)
            else:
                found = response.found.add()
                found.entity.CopyFrom(stored.entity)
                found.version = stored.version
        if which == "new_transaction" and txn is not None:
            response.transaction = txn
        return response

    def commit(self, request: Any, now: float) -> Any:
        mutations = list(request.mutations)
        if len(mutations) > MAX_MUTATIONS:
            raise google_error(
                gexc.InvalidArgument, f"a commit carries at most {MAX_MUTATIONS} mutations"
            )
        keys = [key_id(_mutated_key(m)) for m in mutations]
        reserved = [k for k in keys if _reserved(k)]
        if reserved:
            # Nothing is written; a transaction named here ends, as the engines end one
            # whose commit they refused.
            if request.mode == _TRANSACTIONAL and request.transaction:
                self._end(bytes(request.transaction))
            raise google_error(
                gexc.InvalidArgument,
                f"a namespace or kind named __...__ is reserved: {reserved[0][2:]}",
            )
        txn: bytes | None = None
        single_use = request.WhichOneof("transaction_selector") == "single_use_transaction"
        if single_use:
            txn = self._begin(now)
        elif request.mode == _TRANSACTIONAL:
            txn = self._known(bytes(request.transaction))
        state = self._transactions.get(txn) if txn is not None else None
        if state is not None:
            groups = state.touched | set(keys)
            if not self.pessimistic and len({g[3][:1] for g in groups}) > CLASSIC_ENTITY_GROUPS:
                self._end(txn)
                raise google_error(
                    gexc.InvalidArgument,
                    "operating on too many entity groups in a single transaction",
                )
        if self.pessimistic:
            self._check_free(keys, txn, now, waiter=state)
        elif state is not None:
            moved = [k for k in state.touched | set(keys) if self._written_after(k, state.began_at)]
            if moved:
                self._end(txn)
                raise google_error(gexc.Aborted, "too much contention on these datastore entities")
        try:
            self._check_preconditions(mutations, keys)
        except gexc.GoogleAPICallError:
            self._end(txn)  # a commit is all or nothing: nothing applied, its transaction over
            raise
        self._commits += 1
        before = {k: self.entities.get(k) for k in keys}
        response = CommitResponse()
        for mutation, k in zip(mutations, keys, strict=True):
            response.mutation_results.add().CopyFrom(self._apply(mutation, k))
        if txn is not None:
            self._end(txn)
        after = {k: self.entities.get(k) for k in keys}
        for hook in self.on_commit:
            hook(before, after)
        return response

    def run_query(self, request: Any, now: float) -> Any:
        query = request.query
        kinds = {k.name for k in query.kind}
        partition = request.partition_id
        keys_only = [p.property.name for p in query.projection] == ["__key__"]
        response = RunQueryResponse()
        batch = response.batch
        for k in sorted(self.entities):
            stored = self.entities[k]
            entity = stored.entity
            if k[:3] != (partition.project_id, partition.database_id, partition.namespace_id):
                continue
            if kinds and k[3][-1][0] not in kinds:
                continue
            if query.HasField("filter") and not _matches(query.filter, entity):
                continue
            result = batch.entity_results.add()
            if keys_only:
                result.entity.key.CopyFrom(entity.key)
            else:
                result.entity.CopyFrom(entity)
            result.version = stored.version
        batch.more_results = _NO_MORE_RESULTS
        return response

    # -- transactions and locks ------------------------------------------------------------

    def _begin(self, now: float) -> bytes:
        self._begun += 1
        txn = f"txn-{self._begun}".encode()
        self._transactions[txn] = Transaction(began_at=self._commits, last_used=now)
        return txn

    def began(self, txn: bytes) -> bool:
        """Is ``txn`` a transaction this model began (open or ended)?"""
        number = txn.removeprefix(b"txn-")
        return number.isdigit() and 0 < int(number) <= self._begun

    def waiting_since(self, txn: bytes) -> float | None:
        """When a call of the open transaction ``txn`` began to wait on a lock, if one waits."""
        state = self._transactions.get(txn)
        return state.waiting_since if state is not None else None

    def _known(self, txn: bytes) -> bytes:
        if txn not in self._transactions:
            raise _expired()
        return txn

    def _end(self, txn: bytes | None) -> None:
        if txn is None:
            return
        if self._transactions.pop(txn, None) is None:
            return
        for k in [k for k, holder in self._locks.items() if holder == txn]:
            del self._locks[k]
        for hook in self.on_end:
            hook(txn)

    def _expire(self, now: float) -> None:
        idle = [
            t
            for t, state in self._transactions.items()
            if state.waiting_since is None and now - state.last_used > self.idle_timeout
        ]
        for txn in idle:
            self._end(txn)

    def _check_free(
        self, keys: Iterable[KeyId], txn: bytes | None, now: float, waiter: Transaction | None
    ) -> None:
        """Raise ``Blocked`` while another transaction holds a lock on ``keys``, and
        ``Aborted`` once this call has waited ``lock_timeout``."""
        for k in keys:
            holder = self._locks.get(k)
            if holder is None or holder == txn:
                continue
            if waiter is not None:
                if waiter.waiting_since is None:
                    waiter.waiting_since = now
                if now - waiter.waiting_since >= self.lock_timeout:
                    self._end(txn)
                    raise google_error(gexc.Aborted, "Transaction lock timeout")
                waiter.last_used = now
            raise Blocked(holder)

    def _written_after(self, k: KeyId, seq: int) -> bool:
        stored = self.entities.get(k)
        if stored is None:
            return self._deleted_at.get(k, -1) > seq
        return stored.written_at > seq

    # -- mutations -------------------------------------------------------------------------

    def _check_preconditions(self, mutations: list[Any], keys: list[KeyId]) -> None:
        """Raise what the commit's first failing mutation would (an insert of an entity
        that exists, an update of one that does not) before any is applied: a commit
        applies all its mutations or none."""
        exists = {k for k in keys if k in self.entities}
        for mutation, k in zip(mutations, keys, strict=True):
            op = mutation.WhichOneof("operation")
            if op == "delete":
                exists.discard(k)
                continue
            if op == "insert" and k in exists:
                raise google_error(gexc.AlreadyExists, "entity already exists")
            if op == "update" and k not in exists:
                raise google_error(gexc.NotFound, "no entity to update")
            exists.add(k)

    def _apply(self, mutation: Any, k: KeyId) -> Any:
        op = mutation.WhichOneof("operation")
        result = ds_types.MutationResult.pb()()
        version = self._commits
        if op == "delete":
            if self.entities.pop(k, None) is not None:
                self._deleted_at[k] = self._commits
            result.version = version
            return result
        written = getattr(mutation, op)
        existing = self.entities.get(k)  # preconditions were checked (_check_preconditions)
        entity = type(written)()
        entity.CopyFrom(written)
        transforms = list(mutation.property_transforms) if self.pessimistic else []
        mask = list(mutation.property_mask.paths) if self.pessimistic else []
        if mask and existing is not None:
            merged = type(written)()
            merged.CopyFrom(existing.entity)
            for prop in mask:
                if prop in written.properties:
                    merged.properties[prop].CopyFrom(written.properties[prop])
                else:
                    merged.properties.pop(prop, None)
            entity = merged
        for transform in transforms:
            value = entity.properties[transform.property]
            current = (
                value.integer_value if value.WhichOneof("value_type") == "integer_value" else 0
            )
            added = max(INT64_MIN, min(INT64_MAX, current + transform.increment.integer_value))
            exclude = value.exclude_from_indexes
            value.Clear()
            value.integer_value = added
            value.exclude_from_indexes = exclude
            result.transform_results.add().integer_value = added
        self.entities[k] = Stored(entity, version, self._commits)
        result.version = version
        return result


def google_error(kind: type[gexc.GoogleAPICallError], message: str) -> gexc.GoogleAPICallError:
    """The ``google.api_core`` error ``kind`` with ``message``, as the client raises it."""
    return kind(message)


_RESERVED = re.compile(r"__.*__")


def _reserved(key: KeyId) -> bool:
    """Is the namespace or a kind of ``key`` one Datastore reserves for itself?"""
    return bool(_RESERVED.fullmatch(key[2])) or any(_RESERVED.fullmatch(k) for k, _ in key[3])


def _mutated_key(mutation: Any) -> Any:
    op = mutation.WhichOneof("operation")
    if op == "delete":
        return mutation.delete
    return getattr(mutation, op).key


def _expired() -> gexc.GoogleAPICallError:
    # Firestore's words: store/rpc.py tells a dropped transaction by them.
    return google_error(
        gexc.InvalidArgument, "The referenced transaction has expired or is no longer valid"
    )


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value_type")
    if kind == "timestamp_value":
        return v.timestamp_value.seconds + v.timestamp_value.nanos / 1e9
    return getattr(v, kind) if kind else None


def _matches(filter_pb: Any, entity: Any) -> bool:
    which = filter_pb.WhichOneof("filter_type")
    if which == "composite_filter":
        return all(_matches(f, entity) for f in filter_pb.composite_filter.filters)
    pf = filter_pb.property_filter
    if pf.property.name not in entity.properties:
        return False
    have = _value(entity.properties[pf.property.name])
    if pf.op == _EQUAL:
        return bool(have == _value(pf.value))
    if pf.op == _IN:
        return have in [_value(v) for v in pf.value.array_value.values]
    if pf.op == _LESS_THAN:
        return bool(have < _value(pf.value))
    raise google_error(gexc.InvalidArgument, f"the model does not answer filters with op {pf.op}")
