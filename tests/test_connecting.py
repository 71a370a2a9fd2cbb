"""Connecting: nothing happens when a counter is made; a missing setting is our error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sharded_counter import BoundedCounter, ConfigurationError, Counter, reconnect
from sharded_counter.aio import AsyncCounter

_DATASTORE_ENV = (
    "DATASTORE_EMULATOR_HOST",
    "DATASTORE_EMULATOR_HOST_PATH",
    "DATASTORE_HOST",
    "DATASTORE_DATASET",
    "DATASTORE_PROJECT_ID",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "GCLOUD_PROJECT",
)


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No emulator, no credentials file, no gcloud login; and no look for a metadata
    server (NO_GCE_CHECK), which would send a request off this machine."""
    for name in _DATASTORE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # an empty gcloud config
    monkeypatch.delenv("MEMCACHED_HOSTS", raising=False)
    reconnect()


@pytest.mark.usefixtures("no_credentials")
def test_a_counter_without_credentials_is_made_and_its_first_call_says_what_to_set() -> None:
    counter = Counter("no-credentials")  # made: nothing is connected yet
    bounded = BoundedCounter("no-credentials-bounded", maximum=5)
    for call in (counter.increment, lambda: counter.count, bounded.try_increment):
        with pytest.raises(ConfigurationError) as raised:
            call()
        message = str(raised.value)
        assert "DATASTORE_EMULATOR_HOST" in message
        assert "GOOGLE_APPLICATION_CREDENTIALS" in message
        assert "datastore_client" in message


@pytest.mark.usefixtures("no_credentials")
def test_an_async_counter_without_credentials_says_what_to_set() -> None:
    with pytest.raises(ConfigurationError, match="GOOGLE_APPLICATION_CREDENTIALS"):
        asyncio.run(AsyncCounter("no-credentials").increment())
