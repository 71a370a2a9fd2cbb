"""Redis over TLS (``rediss://``, ``valkeys://``) and the CA it trusts (``cache_ca_file``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sharded_counter.cache.by_url import redis_client_for
from sharded_counter.errors import ConfigurationError
from sharded_counter.settings import Settings, resolve


def test_the_ca_file_comes_from_the_environment_and_reaches_the_connections(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = tmp_path / "server-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")  # read by the TLS handshake, not here
    monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", "rediss://cache.internal:6378")
    monkeypatch.setenv("SHARDED_COUNTER_CACHE_CA_FILE", str(ca))
    client = redis_client_for(resolve())
    assert client is not None
    kwargs = client._pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == str(ca)
    assert client._pool.connection_class.__name__ == "SSLConnection"


def test_without_a_ca_file_tls_trusts_the_systems_cas() -> None:
    client = redis_client_for(Settings(cache_url="valkeys://cache.internal:6378"))
    assert client is not None
    assert "ssl_ca_certs" not in client._pool.connection_kwargs


def test_the_ca_file_is_not_used_without_tls(tmp_path: Path) -> None:
    """A plain redis:// connection has no certificate to check: the file is not read."""
    settings = Settings(cache_url="redis://h:6379", cache_ca_file=str(tmp_path / "absent.pem"))
    client = redis_client_for(settings)
    assert client is not None
    assert client._pool.connection_class.__name__ == "Connection"


def test_a_ca_file_that_cannot_be_read_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    settings = Settings(cache_url="rediss://h:6378", cache_ca_file=str(missing))
    unreadable = r"cache_ca_file .*no-such-ca\.pem.* cannot be read"
    with pytest.raises(ConfigurationError, match=unreadable):
        redis_client_for(settings)


def test_a_ca_file_that_is_no_string_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="cache_ca_file must be a str"):
        resolve({"cache_ca_file": 42})
