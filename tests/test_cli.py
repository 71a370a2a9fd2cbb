"""The ``sharded-counter`` command: argument errors, ``env``, and a round trip on real backends."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cachekit import dead_cache_url
from click.testing import CliRunner, Result
from rich.console import Console

import sharded_counter
from sharded_counter.tools.cli import main
from sharded_counter_emulator import Memcached, RedisCluster, RedisServer, free_port


@pytest.fixture(autouse=True)
def no_config_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no config/ directory here


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables as wide as they like, so that no cell is folded over two lines."""
    monkeypatch.setenv("COLUMNS", "400")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_clean_failure(result: Result, *, mentions: str) -> None:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert mentions in result.output


def test_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in (
        "demo",
        "count",
        "increment",
        "set",
        "delete",
        "env",
        "flush",
        "purge-keys",
        "bounded",
    ):
        assert command in result.output


def test_bad_engine_is_refused() -> None:
    result = invoke("demo", "--engine", "mysql")
    assert_clean_failure(result, mentions="mysql")
    assert result.exit_code == 2


@pytest.mark.parametrize("option", [("--threads", "0"), ("--seconds", "0"), ("--shards", "-1")])
def test_bad_demo_numbers_are_refused(option: tuple[str, str]) -> None:
    result = invoke("demo", *option)
    assert_clean_failure(result, mentions=option[0])
    assert result.exit_code == 2


@pytest.mark.parametrize("amount", ["abc", "1.5", "", "1e3", "--5"])
def test_increment_needs_an_integer(amount: str) -> None:
    result = invoke("increment", "hits", amount)
    assert_clean_failure(result, mentions=repr(amount) if amount != "--5" else "--5")


def test_demo_reports_a_missing_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    from sharded_counter.tools import demo
    from sharded_counter_emulator import MissingDependency

    def missing(**_: object) -> bool:
        raise MissingDependency("memcached", "memcached is not installed: run 'apt-get install'")

    monkeypatch.setattr(demo, "run", missing)
    result = invoke("demo")
    assert_clean_failure(result, mentions="memcached is not installed")
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1


def test_demo_exit_status_says_whether_counts_were_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    from sharded_counter.tools import demo

    calls: list[dict[str, object]] = []

    def inexact(**kwargs: object) -> bool:
        calls.append(kwargs)
        return False

    monkeypatch.setattr(demo, "run", inexact)
    result = invoke("demo", "--engine", "firestore", "--threads", "3", "--seconds", "0.5")
    assert result.exit_code == 1
    assert calls[0]["engines"] == ("firestore",)
    assert (calls[0]["threads"], calls[0]["seconds"], calls[0]["shards"]) == (3, 0.5, 20)


def test_set_needs_an_integer() -> None:
    assert_clean_failure(invoke("set", "hits", "ten"), mentions="'ten'")
    assert_clean_failure(invoke("set", "hits"), mentions="VALUE")


def test_count_needs_a_name() -> None:
    assert_clean_failure(invoke("count"), mentions="NAME")


def test_bad_shards_option() -> None:
    assert_clean_failure(invoke("increment", "hits", "--shards", "0"), mentions="--shards")


def test_library_errors_are_one_clean_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # The name is checked before anything connects, so no backend is needed.
    result = invoke("increment", "x" * 1501)
    assert_clean_failure(result, mentions="1501 bytes")
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1


def test_env_lists_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMCACHED_HOSTS", raising=False)
    result = invoke("env")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("shards" in line and "10" in line for line in lines)
    assert "retry_deadline" in result.output
    assert "config file" in result.output
    assert "none" in result.output


@pytest.mark.usefixtures("wide")
def test_env_shows_the_config_file_and_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "counters.toml"
    path.write_text("[sharded_counter]\nshards = 7\n")
    monkeypatch.setenv("SHARDED_COUNTER_CONFIG", str(path))
    monkeypatch.setenv("MEMCACHED_HOSTS", "127.0.0.1:1")
    result = invoke("env")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("shards" in line and "7" in line and "config file" in line for line in lines)
    assert any("memcached_hosts" in line and "MEMCACHED_HOSTS" in line for line in lines)
    assert str(path) in result.output


def test_env_reports_a_bad_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "counters.toml"
    path.write_text("[sharded_counter]\nshards = 0\n")
    monkeypatch.setenv("SHARDED_COUNTER_CONFIG", str(path))
    result = invoke("env")
    assert_clean_failure(result, mentions="shards")
    assert result.exit_code == 1


@pytest.mark.backends
@pytest.mark.usefixtures("wide")
def test_round_trip_on_real_backends(sharded_counter_env: dict[str, str]) -> None:
    def run(*args: str) -> str:
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        return result.output

    def row(output: str) -> list[str]:
        [line] = [line for line in output.splitlines() if " hits " in f" {line} "]
        return [cell.strip() for cell in line.strip("│┃ ").split("│")]

    assert "hits +5 -> 5" in run("increment", "hits", "5")
    assert "hits -2 -> 3" in run("increment", "hits", "-2")
    assert row(run("count", "hits")) == ["hits", "3", "3", "3", "0"]
    assert "hits = 10" in run("set", "hits", "10")
    assert row(run("count", "hits"))[:4] == ["hits", "10", "10", "10"]
    assert row(run("verify", "hits")) == ["hits", "10", "10", "0", "+0", "yes"]
    assert "deleted hits" in run("delete", "hits")
    assert row(run("count", "hits"))[:4] == ["hits", "0", "0", "0"]
    # What a SharedBuffer leaves in memcache, written by the flush command.
    from sharded_counter import SharedBuffer

    SharedBuffer(interval=60).increment("hits", 4)
    assert row(run("count", "hits")) == ["hits", "4", "4", "0", "4"]
    assert "flushed 1 counter" in run("flush")
    assert row(run("count", "hits")) == ["hits", "4", "4", "4", "0"]
    assert "flushed 0 counters" in run("flush")


@pytest.mark.backends
@pytest.mark.usefixtures("wide")
def test_bounded_shows_and_changes_a_bounded_counter(sharded_counter_env: dict[str, str]) -> None:
    from sharded_counter import BoundedCounter

    def cells(output: str, first: str) -> list[str]:
        [line] = [line for line in output.splitlines() if line.strip("│┃ ").startswith(first)]
        return [cell.strip() for cell in line.strip("│┃ ").split("│")]

    result = invoke("bounded", "seats")
    assert_clean_failure(result, mentions="not a bounded counter")
    seats = BoundedCounter("seats", maximum=10, shards=2)
    seats.increment(4)
    shown = invoke("bounded", "seats")
    assert shown.exit_code == 0, shown.output
    assert "seats: 4 in [none, 10]" in shown.output
    assert cells(shown.output, "all") == ["all", "4", "6", "none"]
    assert len([line for line in shown.output.splitlines() if line.strip("│┃ ")[:1] in "01"]) == 2
    # A plan upgrade and a floor, with more shards: the total stays.
    changed = invoke("bounded", "seats", "--max", "20", "--min", "0", "--shards", "4")
    assert changed.exit_code == 0, changed.output
    assert "seats: 4 in [0, 20]" in changed.output
    assert cells(changed.output, "all") == ["all", "4", "16", "4"]
    assert BoundedCounter("seats", minimum=0, maximum=20).count == 4
    # Bounds the total is outside of are refused, nothing written.
    refused = invoke("bounded", "seats", "--max", "3")
    assert_clean_failure(refused, mentions="refused a total of 4")
    assert invoke("bounded", "seats", "--max", "5", "--no-max").exit_code == 2
    assert "seats: 4 in [0, 20]" in invoke("bounded", "seats").output
    # A plain counter's name becomes bounded when asked.
    assert invoke("increment", "plain", "3").exit_code == 0
    made = invoke("bounded", "plain", "--max", "5")
    assert made.exit_code == 0, made.output
    assert "plain: 3 in [none, 5]" in made.output


@pytest.mark.backends
@pytest.mark.usefixtures("wide")
def test_count_reads_the_shards_when_the_cache_is_down(
    sharded_counter_env: dict[str, str],
    sharded_counter_cache: Memcached | RedisServer | RedisCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert invoke("increment", "hits", "7").exit_code == 0
    dead = dead_cache_url(sharded_counter_cache, free_port())
    monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", dead)  # of the kind in use: nothing there
    result = invoke("count", "hits")
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.output.splitlines() if " hits " in f" {line} "]
    cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
    assert cells == ["hits", "7", "cache down", "7", "unknown"]
    assert "the cache is unavailable" in result.output


@pytest.mark.backends
def test_verify_reports_drift_and_repair_mends_it(sharded_counter_env: dict[str, str]) -> None:
    from google.cloud import datastore

    from sharded_counter import Counter

    counter = Counter("hits", shards=1)
    counter.increment(4)
    assert counter.count == 4
    client = datastore.Client()
    query = client.query(kind="CounterShard")
    query.add_filter(filter=datastore.query.PropertyFilter("name", "=", "hits"))
    (shard,) = query.fetch()
    shard["count"] = 7  # behind the cache's back
    client.put(shard)
    drifted = invoke("verify", "hits")
    assert drifted.exit_code == 1
    assert "NO" in drifted.output and "-3" in drifted.output
    repaired = invoke("repair", "hits")
    assert repaired.exit_code == 0, repaired.output
    assert invoke("verify", "hits").exit_code == 0
    assert counter.count == 7


@pytest.mark.backends
def test_demo_is_exact_on_its_own_backends() -> None:
    from sharded_counter.tools import demo

    out = io.StringIO()
    exact = demo.run(
        engines=("classic",),
        threads=4,
        seconds=1,
        shards=5,
        console=Console(file=out, width=120),
    )
    assert exact, out.getvalue()
    assert "sharded Counter" in out.getvalue()


# Run in a fresh interpreter: a finder first in line refuses sharded_counter.tools, and
# notes every attempt, so that even an import the library caught and shrugged off fails.
_IMPORT_WITH_TOOLS_REFUSED = """
import importlib
import importlib.abc
import sys

attempts = []


class RefuseTools(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "sharded_counter.tools" or name.startswith("sharded_counter.tools."):
            attempts.append(name)
            raise ImportError(f"the library must not import {name}")
        return None


sys.meta_path.insert(0, RefuseTools())
for module in sys.argv[1:]:
    importlib.import_module(module)
if attempts:
    sys.exit(f"the library tried to import {attempts}")
try:
    import sharded_counter.tools
except ImportError:
    print(f"{len(sys.argv) - 1} modules imported; sharded_counter.tools refused")
else:
    sys.exit("sharded_counter.tools was not refused: this check would prove nothing")
"""


def library_modules() -> list[str]:
    """Every module of the library, found on disk (importing them is what is under test)."""
    root = Path(sharded_counter.__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        # __main__ is the command's entry point: importing tools.cli is its job.
        if parts[0] == "tools" or parts == ("__main__",):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(("sharded_counter", *parts)))
    return names


def test_the_library_imports_without_tools() -> None:
    modules = library_modules()
    assert {"sharded_counter", "sharded_counter.counter", "sharded_counter.errors"} <= set(modules)
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_WITH_TOOLS_REFUSED, *modules],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"{len(modules)} modules imported; sharded_counter.tools refused" in result.stdout
