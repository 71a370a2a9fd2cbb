"""Increments that ride on the caller's own Datastore transaction.

``counter.increment(n, transaction=txn)`` reads a shard inside ``txn`` and
stages the new value; the shard is written by ``txn``'s commit, atomically
with the caller's other writes, or not at all. Several increments in one
transaction add up on one staged entity per counter (Datastore refuses two
mutations of one entity in a commit, and a second read in the transaction
would not see the first's staged value).

The cached total is touched only after the commit succeeds: the high-level
client does not report the new versions, so the record is dropped and the
next read rebuilds it from the shards.

An idempotency key is checked and recorded inside the caller's transaction:
its record is read there (a concurrent transaction recording the same key
then conflicts with this one), and if it exists, or the key was staged
already in this transaction, nothing is staged. Otherwise the record is staged
beside the shard and written by the same commit.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable
from typing import Any

from google.api_core.retry import Retry
from google.cloud import datastore

from ..core.keys import IDEMPOTENCY_KIND, SHARD_KIND, idempotency_record_name, shard_key_name
from ..core.validation import fits_int64
from ..errors import CounterOverflowError
from ..settings import Settings

_ATTRIBUTE = "_sharded_counter_joined"

# The reads in a caller's transaction are made once, each within a timeout: the
# client's own default retries them for 60 s and then raises RetryError, which is no
# verdict of the server and which the counter cannot map to IncrementNotRecorded.
_ONCE = Retry(predicate=lambda exc: False)
#: The bound on each read when the caller passes none: the default ``rpc_timeout``.
DEFAULT_READ_TIMEOUT = Settings().rpc_timeout


class JoinedWrites:
    """Counter writes staged on one caller transaction."""

    def __init__(self) -> None:
        self.entities: dict[str, datastore.Entity] = {}  # counter name -> its staged shard
        self.after_commit: dict[str, Callable[[], None]] = {}  # counter name -> cache step
        self.records: dict[str, datastore.Entity] = {}  # record key name -> staged key record


def check_transaction(transaction: Any, project: str) -> datastore.Transaction:
    """``transaction`` if a counter of ``project`` can join it, else TypeError/ValueError."""
    if not isinstance(transaction, datastore.Transaction):
        raise TypeError(
            "transaction must be a google.cloud.datastore.Transaction, "
            f"not {type(transaction).__name__}"
        )
    if transaction.id is None:
        raise ValueError(
            "the transaction is not in progress: use it inside `with client.transaction():`"
        )
    if transaction.project != project:
        raise ValueError(
            f"the transaction is for project {transaction.project!r}, "
            f"the counter's shards live in {project!r}"
        )
    return transaction


def joined_writes(transaction: datastore.Transaction) -> JoinedWrites:
    """The staged writes of ``transaction``, hooking its commit the first time."""
    state: JoinedWrites | None = getattr(transaction, _ATTRIBUTE, None)
    if state is not None:
        return state
    state = JoinedWrites()
    setattr(transaction, _ATTRIBUTE, state)
    commit: Callable[..., Any] = transaction.commit

    def commit_with_counters(*args: Any, **kwargs: Any) -> Any:
        for entity in [*state.entities.values(), *state.records.values()]:
            transaction.put(entity)  # type: ignore[no-untyped-call]
        result = commit(*args, **kwargs)
        for step in state.after_commit.values():
            step()
        return result

    # The instance attribute shadows the method, so `with` blocks call it too.
    transaction.commit = commit_with_counters  # type: ignore[method-assign]
    return state


def stage_increment(
    transaction: Any,
    *,
    name: str,
    shards: int,
    namespace: str | None,
    delta: int,
    after_commit: Callable[[], None],
    idempotency_key: str | None = None,
    key_ttl: float = 0,
    timeout: float = DEFAULT_READ_TIMEOUT,
) -> None:
    """Add ``delta`` to one shard of ``name`` inside ``transaction``; written at its commit.

    With ``idempotency_key``, nothing is staged if the key is applied already
    (recorded in Datastore, or staged earlier in this transaction). Each read is
    one attempt of at most ``timeout`` seconds; a failed one raises the client's
    ``GoogleAPICallError`` with nothing staged.
    """
    state = joined_writes(transaction)
    client = transaction._client
    record: datastore.Entity | None = None
    if idempotency_key is not None:
        record_name = idempotency_record_name(name, idempotency_key)
        if record_name in state.records:
            return
        record_key = client.key(IDEMPOTENCY_KIND, record_name, namespace=namespace)
        found = client.get(record_key, transaction=transaction, retry=_ONCE, timeout=timeout)
        if found is not None:
            return
        record = datastore.Entity(  # type: ignore[no-untyped-call]
            record_key, exclude_from_indexes=("counter", "key", "delta")
        )
        expire_at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=key_ttl
        )
        record.update(
            {"counter": name, "key": idempotency_key, "delta": delta, "expire_at": expire_at}
        )
    entity = state.entities.get(name)
    if entity is None:
        key = client.key(
            SHARD_KIND, shard_key_name(name, random.randrange(shards)), namespace=namespace
        )
        entity = client.get(key, transaction=transaction, retry=_ONCE, timeout=timeout)
        if entity is None:
            entity = datastore.Entity(key, exclude_from_indexes=("count",))  # type: ignore[no-untyped-call]
            entity.update({"name": name, "count": 0})
    value = int(entity.get("count") or 0) + delta
    if not fits_int64(value):
        raise CounterOverflowError(
            f"shard {entity.key.name!r} cannot take {delta} without leaving int64; nothing staged"
        )
    entity["count"] = value
    state.entities[name] = entity
    state.after_commit[name] = after_commit
    if record is not None:
        state.records[record.key.name] = record
