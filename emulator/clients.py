"""The Datastore client a test's environment names, for tests that look at the entities.

``sharded_counter_env`` names the emulator (``DATASTORE_EMULATOR_HOST``), or under
``--sc-backend memory`` this process's in-memory Datastore
(``SHARDED_COUNTER_DATASTORE_URL``). A test that reads what the counters wrote asks
``datastore_client()`` and runs on either.
"""

from __future__ import annotations

import os

from google.cloud import datastore


def datastore_client() -> datastore.Client:
    """A client of the Datastore the environment names: an in-memory one when
    ``SHARDED_COUNTER_DATASTORE_URL`` is set (``memory://``, ``memory://classic``),
    else ``datastore.Client()`` (the emulator, or Google's)."""
    url = os.environ.get("SHARDED_COUNTER_DATASTORE_URL", "").strip()
    if url:
        from sharded_counter.store.rpc import memory_client

        return memory_client(url, project=None, namespace=None, database=None)
    client: datastore.Client = datastore.Client()  # type: ignore[no-untyped-call]
    return client
