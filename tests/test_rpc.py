"""The raw Datastore calls (store/rpc.py): both transports, the headers, and their errors."""

from __future__ import annotations

import pytest
from google.api_core import exceptions as gexc
from google.cloud import datastore

from sharded_counter import Counter
from sharded_counter.store.retry import RETRYABLE
from sharded_counter.store.rpc import DatastoreRpc, LookupRequest
from sharded_counter_emulator import free_port


@pytest.mark.backends
def test_a_client_on_the_http_transport_counts_the_same(
    sharded_counter_env: dict[str, str],
) -> None:
    # Without a gRPC channel the calls go through the generated client's HTTP transport.
    client = datastore.Client(_use_grpc=False)  # type: ignore[no-untyped-call]
    counter = Counter("over-http", datastore_client=client, shards=3)
    assert not hasattr(client._datastore_api, "_transport")
    for _ in range(5):
        counter.increment()
    assert counter.count == 5
    counter.count = 9
    counter.increment(2)
    assert counter.get_count(nocache=True) == 11
    assert counter.count == 11
    assert Counter.get_counts(["over-http"], datastore_client=client) == {"over-http": 11}


def test_calls_carry_the_headers_the_generated_client_sends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    client = datastore.Client(project="p1", database="db2")  # type: ignore[no-untyped-call]
    metadata = dict(DatastoreRpc(client, timeout=1.0)._metadata)
    # Named databases are routed by this header in production.
    assert metadata["x-goog-request-params"] == "project_id=p1&database_id=db2"
    assert "gccl/" in metadata["x-goog-api-client"]


def test_grpc_errors_become_the_api_core_exceptions_the_retry_policy_knows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A real refusal: nothing listens on this port.
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    client = datastore.Client(project="p1")  # type: ignore[no-untyped-call]
    calls = DatastoreRpc(client, timeout=2.0)
    with pytest.raises(gexc.ServiceUnavailable) as caught:
        calls.lookup(LookupRequest(project_id="p1"))
    assert isinstance(caught.value, RETRYABLE)
