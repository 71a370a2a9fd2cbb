"""Redis over TLS (``rediss://``, ``valkeys://``) and the CA it trusts (``cache_ca_file``)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sharded_counter import Counter
from sharded_counter.cache.by_url import redis_client_for
from sharded_counter.cache.redis.commands import CacheNotReached
from sharded_counter.errors import ConfigurationError
from sharded_counter.settings import Settings, resolve
from sharded_counter_emulator.ports import free_port
from sharded_counter_emulator.process import ManagedProcess
from sharded_counter_emulator.redis_server import require_redis_server


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


# -- against a real redis-server that speaks only TLS ---------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certificates(where: Path, *, names: str) -> None:
    """A CA of the test's own (``ca.pem``) and a server certificate it signed for
    ``names`` (a subjectAltName list), as Memorystore gives each instance its own CA."""
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=sharded-counter test CA",
        cwd=where,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=sharded-counter test server",
        cwd=where,
    )  # fmt: skip
    (where / "ext.cnf").write_text(f"subjectAltName={names}\n")
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem",
        cwd=where,
    )  # fmt: skip


def _ask_over_tls(port: int, ca: Path, command: bytes) -> bytes:
    """Send one inline command over TLS; the first line of the reply."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=2.0) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(command + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = tls.recv(64)
            if not chunk:
                break
            reply += chunk
        return reply.strip()


def _answers_ping_over_tls(port: int, ca: Path) -> bool:
    try:
        return _ask_over_tls(port, ca, b"PING") == b"+PONG"
    except OSError:
        return False


def _keys_held(url: str, ca: Path) -> int:
    port = int(url.rsplit(":", 1)[1])
    return int(_ask_over_tls(port, ca, b"DBSIZE").lstrip(b":"))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A redis-server listening only on a TLS port, its certificate signed by a CA of the
    test's own and valid for 127.0.0.1 alone; yields ``(rediss URL, CA file)``."""
    binary = require_redis_server()
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes this test's certificates; it is not installed")
    where = tmp_path_factory.mktemp("tls-redis")
    _make_certificates(where, names="IP:127.0.0.1")
    port = free_port("127.0.0.1")
    argv = [
        binary,
        "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(where / "server.pem"),
        "--tls-key-file", str(where / "server.key"),
        "--tls-ca-cert-file", str(where / "ca.pem"),
        "--tls-auth-clients", "no",
        "--save", "", "--appendonly", "no", "--dir", str(where),
    ]  # fmt: skip
    server = ManagedProcess(f"TLS redis-server on 127.0.0.1:{port}", argv, log_path=where / "log")
    server.start(lambda: _answers_ping_over_tls(port, where / "ca.pem"), 20.0)
    try:
        yield f"rediss://127.0.0.1:{port}", where / "ca.pem"
    finally:
        server.stop()


def test_rediss_with_the_servers_ca_carries_every_call(tls_redis: tuple[str, Path]) -> None:
    url, ca = tls_redis
    client = redis_client_for(Settings(cache_url=url, cache_ca_file=str(ca)))
    assert client is not None
    key = f"tls-{uuid.uuid4().hex}"
    assert client.add(key, b"1") is True
    value, token = client.gets(key)
    assert value == b"1"
    assert client.cas(key, b"2", token) is True
    assert client.incr(key, 40) == 42
    assert client.get(key) == b"42"
    client.close()


def test_a_counter_caches_its_total_over_tls(
    sharded_counter_env: dict[str, str], tls_redis: tuple[str, Path]
) -> None:
    url, ca = tls_redis
    held_before = _keys_held(url, ca)
    counter = Counter(f"tls-{uuid.uuid4().hex}", shards=3, cache_url=url, cache_ca_file=str(ca))
    for _ in range(5):
        counter.increment()
    assert counter.get_count(nocache=True) == 5
    assert counter.count == 5
    # The cached total went to the TLS server, the only cache this counter names.
    assert _keys_held(url, ca) > held_before


def test_an_async_counter_caches_its_total_over_tls(
    sharded_counter_env: dict[str, str], tls_redis: tuple[str, Path]
) -> None:
    import asyncio

    from sharded_counter.aio import AsyncCounter, aclose

    url, ca = tls_redis
    held_before = _keys_held(url, ca)
    name = f"tls-aio-{uuid.uuid4().hex}"

    async def main() -> tuple[int, int]:
        counter = AsyncCounter(name, shards=3, cache_url=url, cache_ca_file=str(ca))
        try:
            for _ in range(4):
                await counter.increment()
            return await counter.get_count(nocache=True), await counter.get_count()
        finally:
            await aclose()

    assert asyncio.run(main()) == (4, 4)
    assert _keys_held(url, ca) > held_before  # its cache is the TLS server


def test_a_server_the_system_does_not_trust_is_never_sent_a_call(
    tls_redis: tuple[str, Path],
) -> None:
    """Without ``cache_ca_file`` the handshake checks the certificate against the system's
    CAs, which did not sign it: the call fails before it is sent."""
    url, _ = tls_redis
    client = redis_client_for(Settings(cache_url=url))
    assert client is not None
    with pytest.raises(CacheNotReached, match="certificate verify failed") as failed:
        client.add(f"tls-{uuid.uuid4().hex}", b"1")
    assert failed.value.maybe_applied is False


def test_a_certificate_for_another_name_is_refused(tls_redis: tuple[str, Path]) -> None:
    """The certificate names 127.0.0.1 only: reached as ``localhost``, it is refused."""
    url, ca = tls_redis
    client = redis_client_for(
        Settings(cache_url=url.replace("127.0.0.1", "localhost"), cache_ca_file=str(ca))
    )
    assert client is not None
    with pytest.raises(CacheNotReached, match="certificate verify failed") as failed:
        client.get_many([f"tls-{uuid.uuid4().hex}"])
    assert failed.value.maybe_applied is False
