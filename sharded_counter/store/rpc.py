"""The five Datastore calls the shard store makes, on raw protobuf messages.

The generated (GAPIC) client turns every request into proto-plus objects,
wraps the call in its retry and timeout layers, adds headers and passes it
through a logging interceptor: about 200 µs of Python per call, which on a
busy writer costs more than the round trip to the server. ``DatastoreRpc``
sends the request protobufs it is given straight down the client's own gRPC
channel (same credentials, same endpoint), with the headers the generated
client would add, and maps gRPC errors to the same ``google.api_core``
exceptions. Where the client has no gRPC channel (its HTTP transport), the
generated client's methods are used instead, on the same messages.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import grpc
from google.api_core import exceptions as gexc
from google.api_core import gapic_v1
from google.cloud import datastore
from google.cloud.datastore_v1.types import datastore as ds_types

from ..memory.backends import MemoryClient, MemoryDatastore
from ..memory.datastore import CALLS
from ..telemetry import telemetry

_SERVICE = "/google.datastore.v1.Datastore/"


class TransactionExpired(gexc.Aborted):
    """The server no longer knows the transaction a request named (an ``Aborted``).

    Datastore answers INVALID_ARGUMENT when a commit, lookup or rollback names a
    transaction it has dropped: one that outlived its time limit, or one begun
    before the server restarted (the classic emulator then says "transaction has
    expired or is invalid"). Nothing of that transaction was applied, so it is
    contention in all but name: the write starts again in a new transaction.
    """


# What Datastore says of a transaction it dropped: the classic emulator, "transaction
# has expired or is invalid"; Firestore, "The referenced transaction has expired or is
# no longer valid".
_TRANSACTION_GONE = re.compile(r"transaction.*(expired|no longer valid|is invalid)", re.I)


def api_error(exc: grpc.RpcError) -> gexc.GoogleAPICallError:
    """The ``google.api_core`` exception for a gRPC error, telling dropped transactions apart."""
    error: gexc.GoogleAPICallError = gexc.from_grpc_error(exc)  # type: ignore[no-untyped-call]
    return refine_error(error)


def refine_error(error: gexc.GoogleAPICallError) -> gexc.GoogleAPICallError:
    """A dropped transaction's ``InvalidArgument`` as ``TransactionExpired``; any other
    error as it is (also for the in-memory model's errors, ``memory/datastore.py``)."""
    if isinstance(error, gexc.InvalidArgument) and _TRANSACTION_GONE.search(str(error.message)):
        return TransactionExpired(  # type: ignore[no-untyped-call]
            error.message, errors=error.errors, response=error.response
        )
    return error


LookupRequest = ds_types.LookupRequest.pb()
CommitRequest = ds_types.CommitRequest.pb()
BeginTransactionRequest = ds_types.BeginTransactionRequest.pb()
RollbackRequest = ds_types.RollbackRequest.pb()
RunQueryRequest = ds_types.RunQueryRequest.pb()


class DatastoreRpc:
    """``lookup``, ``commit``, ``begin_transaction``, ``rollback``, ``run_query``:
    each takes a request protobuf and returns the response protobuf.

    No retries here: every call is bounded by ``timeout`` and retried only by
    the caller's policy (``store/retry.py``).
    """

    def __init__(self, client: datastore.Client, *, timeout: float) -> None:
        self._timeout = timeout
        api: Any = client._datastore_api
        channel = getattr(getattr(api, "_transport", None), "grpc_channel", None)
        self._metadata = call_metadata(client)
        self._calls: dict[str, Callable[[Any], Any]] = {}
        for method, (request_type, _response_type) in CALLS.items():
            if channel is not None:
                self._calls[method] = self._over_grpc(stub_for(channel, method))
            else:
                self._calls[method] = self._over_gapic(getattr(api, method), request_type)
            self._calls[method] = _traced(camel(method), self._calls[method])

    def _over_grpc(self, stub: Any) -> Callable[[Any], Any]:
        timeout, metadata = self._timeout, self._metadata

        def call(request: Any) -> Any:
            try:
                return stub(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as exc:
                raise api_error(exc) from exc

        return call

    def _over_gapic(self, method: Any, request_type: Any) -> Callable[[Any], Any]:
        timeout = self._timeout

        def call(request: Any) -> Any:
            try:
                return method(request=request_type.wrap(request), retry=None, timeout=timeout)._pb
            except gexc.InvalidArgument as exc:
                refined = refine_error(exc)
                if refined is exc:
                    raise
                raise refined from exc

        return call

    def lookup(self, request: Any) -> Any:
        return self._calls["lookup"](request)

    def commit(self, request: Any) -> Any:
        return self._calls["commit"](request)

    def begin_transaction(self, request: Any) -> Any:
        return self._calls["begin_transaction"](request)

    def rollback(self, request: Any) -> Any:
        return self._calls["rollback"](request)

    def run_query(self, request: Any) -> Any:
        return self._calls["run_query"](request)


class MemoryRpc:
    """``DatastoreRpc`` on an in-memory database (``memory/backends.py``): the same five
    calls on the same protobufs, bounded by ``timeout``, traced and failing the same way."""

    def __init__(self, database: MemoryDatastore, *, timeout: float) -> None:
        self._database = database
        self._timeout = timeout

    def _call(self, method: str, request: Any) -> Any:
        with telemetry().datastore_call(camel(method)):
            try:
                return self._database.call(method, request, self._timeout)
            except gexc.GoogleAPICallError as exc:
                raise refine_error(exc) from None

    def lookup(self, request: Any) -> Any:
        return self._call("lookup", request)

    def commit(self, request: Any) -> Any:
        return self._call("commit", request)

    def begin_transaction(self, request: Any) -> Any:
        return self._call("begin_transaction", request)

    def rollback(self, request: Any) -> Any:
        return self._call("rollback", request)

    def run_query(self, request: Any) -> Any:
        return self._call("run_query", request)


def rpc_for(client: datastore.Client, *, timeout: float) -> DatastoreRpc | MemoryRpc:
    """The calls to the database ``client`` names: in this process for a ``MemoryClient``
    (``datastore_url = "memory://"``), else over the client's channel."""
    if isinstance(client, MemoryClient):
        return MemoryRpc(client.memory, timeout=timeout)
    return DatastoreRpc(client, timeout=timeout)


def memory_client(
    url: str, *, project: str | None, namespace: str | None, database: str | None
) -> MemoryClient:
    """The client of the in-memory Datastore ``url`` names (``memory://`` is Firestore in
    Datastore mode, ``memory://classic`` the classic engine)."""
    return MemoryClient(
        url.removeprefix("memory://") or "firestore",
        project=project,
        namespace=namespace,
        database=database,
    )


def call_metadata(client: datastore.Client) -> tuple[tuple[str, str], ...]:
    """What the generated client sends with every call: who is calling, and where the
    request must be routed (needed for named databases)."""
    routing = {"project_id": client.project}
    if client.database:
        routing["database_id"] = client.database
    return (
        client._client_info.to_grpc_metadata(),
        gapic_v1.routing_header.to_grpc_metadata(routing),  # type: ignore[no-untyped-call]
    )


def stub_for(channel: Any, method: str) -> Any:
    """The unary call ``method`` on ``channel`` (a gRPC channel, blocking or asyncio), on
    raw protobufs."""
    request_type, response_type = CALLS[method]
    return channel.unary_unary(
        _SERVICE + camel(method),
        request_serializer=request_type.pb().SerializeToString,
        response_deserializer=response_type.pb().FromString,
    )


def _traced(method: str, call: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``call`` inside a span per call (``telemetry.py``), looked up at each call so that
    ``telemetry.configure`` applies to stores made before it."""

    def traced(request: Any) -> Any:
        with telemetry().datastore_call(method):
            return call(request)

    return traced


def camel(method: str) -> str:
    return "".join(part.capitalize() for part in method.split("_"))
