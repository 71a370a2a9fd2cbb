"""Tests for sharded_counter_emulator, against real emulator and memcached processes."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.cloud import datastore
from pymemcache.client.base import Client as MemcacheClient

import sharded_counter_emulator
from sharded_counter_emulator import (
    ENGINES,
    BackendStack,
    DatastoreEmulator,
    Engine,
    Memcached,
    MissingDependency,
    free_port,
)
from sharded_counter_emulator.cli import main

pytestmark = pytest.mark.backends
pytest_plugins = ["pytester"]

# Bypass any http_proxy from the environment: the emulators are on loopback.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with _DIRECT.open(url, timeout=timeout) as response:
        return int(response.status), bytes(response.read())


def _assert_group_gone(pgid: int | None) -> None:
    assert pgid is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def _memcache_client(server: Memcached) -> MemcacheClient:
    return MemcacheClient((server.host, server.port), connect_timeout=0.5, timeout=0.5)


def _use_emulator(emulator: DatastoreEmulator, monkeypatch: pytest.MonkeyPatch) -> datastore.Client:
    for key, value in emulator.env().items():
        monkeypatch.setenv(key, value)
    return datastore.Client()


def _put(client: datastore.Client, name: str, value: int) -> None:
    entity = datastore.Entity(client.key("Counter", name))
    entity["value"] = value
    client.put(entity)


def _value(client: datastore.Client, name: str) -> object:
    entity = client.get(client.key("Counter", name))
    return None if entity is None else entity["value"]


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH holding only an empty directory: no gcloud, java or memcached."""
    bin_dir = tmp_path / "empty-bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("JAVA", raising=False)
    return bin_dir


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize("engine", ENGINES)
def test_emulator_serves_datastore_and_resets(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with DatastoreEmulator(engine, project="emu-test") as emulator:
        assert emulator.engine == engine
        assert _get(f"http://{emulator.address}/") == (200, b"Ok\n")
        host_port = f"127.0.0.1:{emulator.port}"
        assert emulator.address == host_port
        assert emulator.env() == {
            "DATASTORE_DATASET": "emu-test",
            "DATASTORE_EMULATOR_HOST": host_port,
            "DATASTORE_EMULATOR_HOST_PATH": f"{host_port}/datastore",
            "DATASTORE_HOST": f"http://{host_port}",
            "DATASTORE_PROJECT_ID": "emu-test",
        }
        assert f"export DATASTORE_EMULATOR_HOST={host_port}" in emulator.export_lines().splitlines()

        client = _use_emulator(emulator, monkeypatch)
        _put(client, "hits", 41)
        assert _value(client, "hits") == 41
        emulator.reset()
        assert _value(client, "hits") is None
        pgid = emulator.pgid
    assert not emulator.alive
    _assert_group_gone(pgid)


def test_classic_on_disk_saves_only_on_a_clean_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fact the fault tests rely on: after a SIGKILL the on-disk emulator comes back
    without what it acknowledged since it started, so a crash there loses committed
    writes whatever the client does; only a clean restart keeps them."""
    with DatastoreEmulator("classic", data_dir=str(tmp_path / "ds"), on_disk=True) as emulator:
        client = _use_emulator(emulator, monkeypatch)
        _put(client, "unsaved", 3)
        assert _value(client, "unsaved") == 3
        emulator.kill()
        emulator.start()
        assert _value(datastore.Client(), "unsaved") is None


def test_classic_on_disk_survives_restart_and_pause_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "datastore"
    with DatastoreEmulator("classic", data_dir=str(data_dir), on_disk=True) as emulator:
        client = _use_emulator(emulator, monkeypatch)
        _put(client, "kept", 7)
        port, first_pgid = emulator.port, emulator.pgid

        emulator.restart()
        assert emulator.port == port
        _assert_group_gone(first_pgid)
        assert (data_dir / "WEB-INF" / "appengine-generated" / "local_db.bin").is_file()
        assert _value(datastore.Client(), "kept") == 7

        emulator.pause()
        with pytest.raises(OSError):  # a timeout: the socket accepts, nobody answers
            _get(f"http://{emulator.address}/", timeout=0.5)
        emulator.resume()
        assert _get(f"http://{emulator.address}/") == (200, b"Ok\n")
        pgid = emulator.pgid
    _assert_group_gone(pgid)
    assert data_dir.is_dir(), "a data_dir passed in is the caller's to delete"


def test_memcached_restart_pause_resume_stop() -> None:
    with Memcached(memory_mb=16) as server:
        assert server.address == f"127.0.0.1:{server.port}"
        assert server.env() == {"MEMCACHED_HOSTS": server.address}
        client = _memcache_client(server)
        client.set("k", b"v")
        assert client.get("k") == b"v"
        server.flush_all()
        assert client.get("k") is None
        client.set("k", b"v")
        client.close()

        port, first_pgid = server.port, server.pgid
        server.restart()
        assert server.port == port
        _assert_group_gone(first_pgid)
        client = _memcache_client(server)
        assert client.get("k") is None, "a restarted memcached starts empty"
        client.set("k", b"again")

        server.pause()
        paused = _memcache_client(server)
        with pytest.raises(TimeoutError):
            paused.get("k")
        paused.close()
        server.resume()
        assert _memcache_client(server).get("k") == b"again"
        pgid = server.pgid
    assert not server.alive
    _assert_group_gone(pgid)


def test_missing_memcached_is_one_line_with_install_command(empty_path: Path) -> None:
    with pytest.raises(MissingDependency) as caught:
        Memcached().start()
    assert str(caught.value) == "memcached is not installed: run 'apt-get install -y memcached'"
    assert caught.value.name == "memcached"


@pytest.fixture(scope="session")
def real_gcloud() -> Path:
    """The gcloud of the real SDK, found before any test empties PATH."""
    return sharded_counter_emulator.sdk_root() / "bin" / "gcloud"


def test_missing_gcloud_and_java_are_reported_before_launch(
    real_gcloud: Path, empty_path: Path
) -> None:
    with pytest.raises(MissingDependency, match=r"^the Google Cloud SDK \(gcloud\)") as caught:
        DatastoreEmulator("classic").start()
    assert "\n" not in str(caught.value)

    # gcloud alone on PATH: the SDK is found, java is not.
    (empty_path / "gcloud").symlink_to(real_gcloud)
    with pytest.raises(MissingDependency) as caught:
        DatastoreEmulator("firestore").start()
    assert str(caught.value) == (
        "java is not installed: run 'apt-get install -y openjdk-17-jre-headless'"
    )


def test_check_reports_each_dependency(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    names = ["gcloud", "java", "cloud-datastore-emulator", "cloud-firestore-emulator", "memcached"]
    assert main(["check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1].rstrip(":") for line in lines] == names
    assert all(line.startswith("ok ") for line in lines)

    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["check"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(names)
    assert (
        "missing  memcached: memcached is not installed: run 'apt-get install -y memcached'"
    ) in lines


def test_stack_starts_engines_lazily_and_joins_memcached_hosts() -> None:
    stack = BackendStack(engines=("classic", "firestore"), memcached=2)
    try:
        env = stack.env("classic")
        servers = stack.memcached
        assert env["MEMCACHED_HOSTS"] == f"{servers[0].address} {servers[1].address}"
        assert env["DATASTORE_EMULATOR_HOST"] == stack.datastore["classic"].address
        assert _get(f"http://{env['DATASTORE_EMULATOR_HOST']}/")[1] == b"Ok\n"
        assert stack.running_engines == ("classic",), "an engine nobody asked for stays off"
        pgids = [stack.datastore["classic"].pgid, *(s.pgid for s in servers)]
    finally:
        stack.stop()
    for pgid in pgids:
        _assert_group_gone(pgid)


def _package_pythonpath() -> str:
    # Wherever this run imports the package from, the child imports it from there too.
    package_parent = Path(sharded_counter_emulator.__file__).parent.parent
    return os.pathsep.join(filter(None, [str(package_parent), os.environ.get("PYTHONPATH")]))


def test_cli_start_prints_exports_and_stops_on_sigterm() -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "sharded_counter_emulator", "start",
         "--engine", "firestore", "--memcached", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": _package_pythonpath()},
    )  # fmt: skip
    watchdog = threading.Timer(60, child.kill)  # never let a hung child hang the suite
    watchdog.start()
    try:
        assert child.stdout is not None
        exports: dict[str, str] = {}
        for line in child.stdout:
            key, _, value = line.removeprefix("export ").rstrip("\n").partition("=")
            exports[key] = value
            if key == "MEMCACHED_HOSTS":
                break
        assert set(exports) == {
            "DATASTORE_DATASET",
            "DATASTORE_EMULATOR_HOST",
            "DATASTORE_EMULATOR_HOST_PATH",
            "DATASTORE_HOST",
            "DATASTORE_PROJECT_ID",
            "MEMCACHED_HOSTS",
        }
        emulator_host = exports["DATASTORE_EMULATOR_HOST"]
        assert _get(f"http://{emulator_host}/") == (200, b"Ok\n")
        memcached_hosts = exports["MEMCACHED_HOSTS"].strip("'").split()
        assert len(memcached_hosts) == 2

        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
    finally:
        watchdog.cancel()
        child.kill()
        child.wait()
    for address in [emulator_host, *memcached_hosts]:
        host, _, port = address.rpartition(":")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=2).close()


def _plugin_args() -> list[str]:
    """``-p`` for the plugin, unless the installed project registers it already; and
    pytest-asyncio's loop scope, which it warns about when a project leaves it unset."""
    args = ["-o", "asyncio_default_fixture_loop_scope=function"]
    registered = importlib.metadata.entry_points(group="pytest11")
    if any(ep.value == "sharded_counter_emulator.pytest_plugin" for ep in registered):
        return args
    return [*args, "-p", "sharded_counter_emulator.pytest_plugin"]


_PLUGIN_TESTS = """
import os

from google.cloud import datastore


def test_plain():
    pass


def test_counts(sharded_counter_env, sharded_counter_engine):
    assert os.environ["DATASTORE_EMULATOR_HOST"] == sharded_counter_env["DATASTORE_EMULATOR_HOST"]
    assert os.environ["MEMCACHED_HOSTS"] == sharded_counter_env["MEMCACHED_HOSTS"]
    client = datastore.Client()
    key = client.key("Counter", "x")
    assert client.get(key) is None
    entity = datastore.Entity(key)
    entity["value"] = sharded_counter_engine
    client.put(entity)


def test_counts_isolated(sharded_counter_env, sharded_counter_memcached, sharded_counter_backends):
    assert sharded_counter_env["MEMCACHED_HOSTS"] == sharded_counter_memcached.address
    client = datastore.Client()
    assert client.get(client.key("Counter", "x")) is None
"""


@pytest.fixture
def plugin_tests(pytester: pytest.Pytester) -> Iterator[pytest.Pytester]:
    pytester.makepyfile(test_inner=_PLUGIN_TESTS)
    yield pytester


def test_plugin_runs_each_engine_with_clean_backends(plugin_tests: pytest.Pytester) -> None:
    result = plugin_tests.runpytest(*_plugin_args(), "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines_random(
        [
            "*test_counts[[]classic[]] PASSED*",
            "*test_counts[[]firestore[]] PASSED*",
            "*test_counts_isolated[[]classic[]] PASSED*",
            "*test_counts_isolated[[]firestore[]] PASSED*",
        ]
    )


_OTHER_PROJECT_CONFTEST = """
import pytest


@pytest.fixture(params=["sqlite", "postgres"])
def datastore_engine(request):
    return request.param


@pytest.fixture
def backend_env(datastore_engine):
    return {"ENGINE": datastore_engine}


@pytest.fixture
def memcached_server():
    return "their own"
"""

_OTHER_PROJECT_TESTS = """
import pytest


def test_uses_its_own_fixtures(backend_env, memcached_server):
    assert memcached_server == "their own"
    assert backend_env["ENGINE"] in ("sqlite", "postgres")


def test_plain_env(backend_env):
    assert backend_env


@pytest.mark.backends
def test_marked():
    pass
"""


def test_another_projects_fixtures_of_common_names_are_left_alone(
    pytester: pytest.Pytester,
) -> None:
    """Installing us loads the plugin into every project: a project whose own fixtures
    are called backend_env, datastore_engine or memcached_server runs its tests as it
    wrote them (once per its own params), and our ``backends`` marker is registered."""
    pytester.makeconftest(_OTHER_PROJECT_CONFTEST)
    pytester.makepyfile(test_theirs=_OTHER_PROJECT_TESTS)
    result = pytester.runpytest(*_plugin_args(), "-v", "--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines_random(
        [
            "*test_uses_its_own_fixtures[[]sqlite[]] PASSED*",
            "*test_uses_its_own_fixtures[[]postgres[]] PASSED*",
            "*test_plain_env[[]sqlite[]] PASSED*",
            "*test_plain_env[[]postgres[]] PASSED*",
            "*test_marked PASSED*",
        ]
    )
    result.stdout.no_fnmatch_line("*classic*")


def test_the_docs_testing_example_runs_once_per_engine(pytester: pytest.Pytester) -> None:
    page = Path(__file__).resolve().parent.parent / "docs" / "testing.md"
    section = page.read_text(encoding="utf-8").split("# Testing your own app", 1)[1]
    section = section.split("\n## ", 1)[0]
    pytester.makepyfile(test_docs=section.split("```python\n", 1)[1].split("```", 1)[0])
    result = pytester.runpytest(*_plugin_args(), "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines_random(
        ["*test_hits[[]classic[]] PASSED*", "*test_hits[[]firestore[]] PASSED*"]
    )


def test_plugin_fails_rather_than_skips_without_dependencies(
    plugin_tests: pytest.Pytester, empty_path: Path
) -> None:
    result = plugin_tests.runpytest(
        *_plugin_args(), "--sc-engines=classic", "-p", "no:cacheprovider"
    )
    # test_plain needs no backend, so it passes: loading the plugin started nothing.
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        ["*memcached is not installed: run 'apt-get install -y memcached'*"]
    )
    result.stdout.no_fnmatch_line("*skipped*")
