"""Datastore calls bound to one project, database and namespace.

``DatastoreCalls`` builds the keys and requests of one partition. Its calls are
steps (core/effects.py): each yields one ``Rpc`` effect, which a shell sends
through ``DatastoreRpc`` (store/rpc.py) or its asyncio twin, bounded by
``rpc_timeout`` and retried only by the callers' policy (store/retry.py).
``run`` drives steps in this thread, for the paths not yet written as steps.
The shard store and the key records (store/keyed.py) share one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.cloud import datastore
from google.cloud.datastore_v1.types import datastore as ds_types
from google.cloud.datastore_v1.types import entity as entity_types
from google.cloud.datastore_v1.types import query as query_types

from ..core.effects import Effect, Rpc, Steps, drive
from . import rpc
from .entities import KeyPb

T = TypeVar("T")

_TRANSACTIONAL = ds_types.CommitRequest.Mode.TRANSACTIONAL
_NON_TRANSACTIONAL = ds_types.CommitRequest.Mode.NON_TRANSACTIONAL
_NOT_FINISHED = query_types.QueryResultBatch.MoreResultsType.NOT_FINISHED


class DatastoreCalls:
    """Keys and raw calls of one Datastore project, database and namespace."""

    def __init__(self, client: datastore.Client, *, rpc_timeout: float) -> None:
        self.client = client
        self.rpc = rpc.rpc_for(client, timeout=rpc_timeout)
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
        """Names where these entities live, so cache keys of two scopes never meet."""
        p = self.partition
        return f"{p.project_id}/{p.database_id}/{p.namespace_id}"

    def key_for(self, key_name: str, kind: str) -> Any:
        key = KeyPb()
        key.partition_id.CopyFrom(self.partition)
        element = key.path.add()
        element.kind = kind
        element.name = key_name
        return key

    def run(self, steps: Steps[T]) -> T:
        """Carry out ``steps`` that ask only for Datastore calls, in this thread."""
        return drive(steps, self.perform)

    def perform(self, effect: Effect) -> Any:
        """One Datastore call of steps, made in this thread."""
        if not isinstance(effect, Rpc):
            raise TypeError(f"the store carries out Datastore calls only, not {effect!r}")
        return getattr(self.rpc, effect.method)(effect.request)

    def begin(self) -> Steps[bytes]:
        request = rpc.BeginTransactionRequest(**self.base)
        request.transaction_options.read_write.SetInParent()
        response = yield Rpc("begin_transaction", request)
        return bytes(response.transaction)

    def rollback(self, transaction: bytes) -> Steps[None]:
        yield Rpc("rollback", rpc.RollbackRequest(transaction=transaction, **self.base))

    def close(self, transaction: bytes) -> Steps[None]:
        """Roll ``transaction`` back once, to learn that no commit of it can land any
        more: returns once the server said so, raises what else came back.

        A commit that waits on a lock is not dropped at its caller's deadline; on the
        Firestore emulator a rollback of its transaction answers only once that
        commit has landed or failed, with INTERNAL ("Can't swap from CLOSED to
        ACTIVE", raised: ask again), and the next rollback answers OK at once. OK
        also answers for a transaction committed or rolled back before, and
        ``InvalidArgument`` for one the server does not know (expired, or begun
        before a restart): closed either way (docs/protocol.md, W6')."""
        try:
            yield from self.rollback(transaction)
        except (gexc.InvalidArgument, rpc.TransactionExpired):
            return

    def quiet_rollback(self, transaction: bytes) -> Steps[None]:
        # Releasing locks early helps the pessimistic engine; failing to is harmless
        # (the transaction expires), so it must not hide the original error.
        with contextlib.suppress(Exception):
            yield from self.rollback(transaction)

    def lookup(
        self, keys: Sequence[Any], *, transaction: bytes | None = None, begin: bool = False
    ) -> Steps[tuple[dict[bytes, Any], dict[bytes, int], bytes | None]]:
        """Found entities and versions by serialized key, and the transaction begun, if any."""
        request = rpc.LookupRequest(keys=keys, **self.base)
        if transaction is not None:
            request.read_options.transaction = transaction
        elif begin:
            request.read_options.new_transaction.read_write.SetInParent()
        response = yield Rpc("lookup", request)
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
            more_found, more_versions, _ = yield from self.lookup(
                list(response.deferred), transaction=transaction or response.transaction or None
            )
            found.update(more_found)
            versions.update(more_versions)
        return found, versions, (bytes(response.transaction) or None) if begin else None

    def commit(
        self,
        mutations: Sequence[Any],
        transaction: bytes | None = None,
        *,
        single_use: bool = False,
    ) -> Steps[Any]:
        """Commit Mutation protobufs: in ``transaction``, in a transaction of their own
        (``single_use``: all or nothing, in one call), or on their own."""
        request = rpc.CommitRequest(mutations=mutations, **self.base)
        if transaction is not None:
            request.mode = _TRANSACTIONAL
            request.transaction = transaction
        elif single_use:
            request.single_use_transaction.read_write.SetInParent()
        else:
            request.mode = _NON_TRANSACTIONAL
        response = yield Rpc("commit", request)
        return response

    def run_query(self, request: Any) -> Steps[list[Any]]:
        """Every EntityResult of a RunQueryRequest, batch after batch."""
        results: list[Any] = []
        while True:
            response = yield Rpc("run_query", request)
            batch = response.batch
            results.extend(batch.entity_results)
            if batch.more_results != _NOT_FINISHED or not batch.entity_results:
                return results
            request.query.start_cursor = batch.end_cursor

    def query_request(self) -> Any:
        """A RunQueryRequest for this partition, its query to be filled in."""
        return rpc.RunQueryRequest(partition_id=self.partition, **self.base)
