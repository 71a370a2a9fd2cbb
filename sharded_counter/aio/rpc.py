"""The five Datastore calls on a ``grpc.aio`` channel: store/rpc.py for asyncio.

The same request and response protobufs, the same headers, the same mapping
of gRPC errors to ``google.api_core`` exceptions; only the channel differs. It
goes where the blocking client's channel goes: to the emulator named by
``DATASTORE_EMULATOR_HOST`` without TLS, otherwise to the client's endpoint
with TLS and the client's credentials.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import grpc
from google.api_core import exceptions as gexc
from google.cloud import datastore

from ..memory.backends import MemoryClient, MemoryDatastore
from ..memory.datastore import CALLS
from ..store.rpc import api_error, call_metadata, camel, refine_error, stub_for
from ..telemetry import telemetry


def open_channel(client: datastore.Client) -> grpc.aio.Channel:
    """An asyncio channel to where ``client`` sends its calls (must run in the loop)."""
    parsed = urlparse(client._base_url)
    host = parsed.netloc
    if parsed.scheme != "https":
        return grpc.aio.insecure_channel(host)
    import google.auth.transport.grpc
    import google.auth.transport.requests

    plugin = google.auth.transport.grpc.AuthMetadataPlugin(  # type: ignore[no-untyped-call]
        client._credentials, google.auth.transport.requests.Request()
    )
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(), grpc.metadata_call_credentials(plugin)
    )
    return grpc.aio.secure_channel(host, credentials)


class AsyncMemoryRpc:
    """``AsyncDatastoreRpc`` on an in-memory database (``memory/backends.py``)."""

    def __init__(self, database: MemoryDatastore, *, timeout: float) -> None:
        self._database = database
        self._timeout = timeout

    async def call(self, method: str, request: Any) -> Any:
        with telemetry().datastore_call(camel(method)):
            try:
                return await self._database.call_async(method, request, self._timeout)
            except gexc.GoogleAPICallError as exc:
                raise refine_error(exc) from None

    async def close(self) -> None:
        """Nothing to close: the entities stay for the next client."""


def async_rpc_for(
    client: datastore.Client, *, timeout: float
) -> AsyncDatastoreRpc | AsyncMemoryRpc:
    """The asyncio calls to the database ``client`` names (``store/rpc.py``'s ``rpc_for``)."""
    if isinstance(client, MemoryClient):
        return AsyncMemoryRpc(client.memory, timeout=timeout)
    return AsyncDatastoreRpc(client, timeout=timeout)


class AsyncDatastoreRpc:
    """``lookup``, ``commit``, ``begin_transaction``, ``rollback``, ``run_query`` as
    coroutines: a request protobuf in, the response protobuf out, each bounded by
    ``timeout``. No retries here (store/retry.py's policy decides)."""

    def __init__(self, client: datastore.Client, *, timeout: float) -> None:
        self._timeout = timeout
        self._metadata = call_metadata(client)
        self.channel = open_channel(client)
        self._stubs = {method: stub_for(self.channel, method) for method in CALLS}

    async def call(self, method: str, request: Any) -> Any:
        with telemetry().datastore_call(camel(method)):
            try:
                return await self._stubs[method](
                    request, timeout=self._timeout, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                raise api_error(exc) from exc

    async def close(self) -> None:
        await self.channel.close()
