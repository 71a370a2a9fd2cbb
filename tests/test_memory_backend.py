"""The in-memory backends for applications' tests (memory/backends.py): ``memory://`` as
the cache and as Datastore. No Java, emulator or memcached is started here; the
cache's behaviour against real memcached and Redis is test_cache_conformance.py's
(its ``memory`` rows), and the suite's behaviour tests run on these backends with
``--sc-backend memory`` (docs/testing.md lists what they leave out)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from google.api_core import exceptions as gexc

from sharded_counter import ConfigurationError, Counter, RateLimiter
from sharded_counter.aio import AsyncCounter
from sharded_counter.memory.backends import MemoryDatastore, memory_cache, reset_memory
from sharded_counter.store import rpc
from sharded_counter_emulator import datastore_client

REPO = Path(__file__).resolve().parent.parent
MEMORY = {"cache_url": "memory://", "datastore_url": "memory://"}


@pytest.fixture(autouse=True)
def empty_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MEMCACHED_HOSTS", "DATASTORE_EMULATOR_HOST", "SHARDED_COUNTER_CACHE_URL"):
        monkeypatch.delenv(name, raising=False)
    reset_memory()


def increment_from_threads(counter: Counter, threads: int = 8, each: int = 50) -> None:
    """``threads`` threads at once, each incrementing ``counter`` by 1 ``each`` times."""

    def work() -> None:
        for _ in range(each):
            counter.increment()

    running = [threading.Thread(target=work) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()


@pytest.mark.parametrize("datastore_url", ["memory://", "memory://classic"])
def test_a_counter_on_memory_counts_every_thread_exactly(datastore_url: str) -> None:
    counter = Counter("hits", shards=4, cache_url="memory://", datastore_url=datastore_url)
    increment_from_threads(counter)  # 8 threads, 50 each
    assert counter.get_count(nocache=True) == 400
    assert counter.count == 400
    counter.count = 7
    assert (counter.count, counter.get_count(nocache=True)) == (7, 7)


def test_the_two_engines_and_two_cache_names_are_apart() -> None:
    Counter("c", cache_url="memory://", datastore_url="memory://").increment(3)
    classic = Counter("c", cache_url="memory://other", datastore_url="memory://classic")
    assert classic.get_count(nocache=True) == 0
    classic.increment(2)
    assert Counter("c", **MEMORY).get_count(nocache=True) == 3
    assert memory_cache("other").get_many([]) == {}


def test_an_async_counter_shares_the_process_memory_with_the_blocking_one() -> None:
    async def count() -> tuple[int, int]:
        counter = AsyncCounter("shared", **MEMORY)
        await asyncio.gather(*(counter.increment() for _ in range(30)))
        return await counter.get_count(), await counter.get_count(nocache=True)

    Counter("shared", **MEMORY).increment(5)
    assert asyncio.run(count()) == (35, 35)
    assert Counter("shared", **MEMORY).get_count(nocache=True) == 35


def test_reset_memory_empties_the_cache_and_datastore() -> None:
    counter = Counter("gone", **MEMORY)
    counter.increment(4)
    assert RateLimiter("1/minute", cache_url="memory://").hit("k").allowed
    reset_memory()
    assert counter.get_count(nocache=True) == 0
    assert RateLimiter("1/minute", cache_url="memory://").hit("k").allowed


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("datastore_url", "memory://nosuch", "memory://classic"),
        ("datastore_url", "http://localhost:8081", "unset for Google's"),
        ("cache_url", "memory://a b", "memory:// takes only a name"),
        ("cache_url", "memory://x?y=1", "take no options"),
    ],
)
def test_a_bad_memory_url_is_a_configuration_error_before_anything_is_written(
    option: str, value: str, says: str
) -> None:
    with pytest.raises(ConfigurationError, match=says):
        Counter("never", **{**MEMORY, option: value})


def _lookup_in(transaction: bytes, key: Any) -> Any:
    request = rpc.LookupRequest(project_id="memory")
    request.keys.append(key)
    request.read_options.transaction = transaction
    return request


def _begin() -> Any:
    request = rpc.BeginTransactionRequest(project_id="memory")
    request.transaction_options.read_write.SetInParent()
    return request


def _key() -> Any:
    key = rpc.LookupRequest().keys.add()
    key.partition_id.project_id = "memory"
    element = key.path.add()
    element.kind, element.name = "K", "a"
    return key


def test_firestore_modes_second_reader_waits_for_the_first_to_end() -> None:
    database = MemoryDatastore("firestore")
    first = database.call("begin_transaction", _begin(), 1.0).transaction
    second = database.call("begin_transaction", _begin(), 1.0).transaction
    database.call("lookup", _lookup_in(first, _key()), 1.0)  # holds the lock
    waited: list[float] = []

    def read() -> None:
        started = time.monotonic()
        database.call("lookup", _lookup_in(second, _key()), 5.0)
        waited.append(time.monotonic() - started)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.3)
    assert reader.is_alive()  # still waiting for the lock
    rollback = rpc.RollbackRequest(project_id="memory", transaction=first)
    database.call("rollback", rollback, 1.0)
    reader.join(timeout=5)
    assert waited and 0.25 < waited[0] < 2.0


def test_a_lock_held_too_long_aborts_the_waiter_as_the_emulator_does() -> None:
    database = MemoryDatastore("firestore")
    first = database.call("begin_transaction", _begin(), 1.0).transaction
    second = database.call("begin_transaction", _begin(), 1.0).transaction
    database.call("lookup", _lookup_in(first, _key()), 1.0)
    started = time.monotonic()
    with pytest.raises(gexc.Aborted):
        database.call("lookup", _lookup_in(second, _key()), 10.0)
    assert 1.9 < time.monotonic() - started < 4.0  # the lock timeout, 2 s
    with pytest.raises(gexc.DeadlineExceeded):
        third = database.call("begin_transaction", _begin(), 1.0).transaction
        database.call("lookup", _lookup_in(third, _key()), 0.2)  # its own deadline first


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_counts_in_a_copy_of_its_own() -> None:
    """A child starts with a copy of the parent's memory (and fresh locks, though a
    parent's thread held one at the fork) and shares nothing with it after."""
    counter = Counter("forked", **MEMORY)
    counter.increment(2)
    holder_ready, release = threading.Event(), threading.Event()
    cache = memory_cache("")

    def hold_the_cache_lock() -> None:
        with cache._lock:
            holder_ready.set()
            release.wait(5)

    holder = threading.Thread(target=hold_the_cache_lock)
    holder.start()
    holder_ready.wait(5)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: count, and say what it read
        try:
            counter.increment(10)
            os.write(write, str(counter.get_count(nocache=True)).encode())
        finally:
            os._exit(0)
    release.set()
    holder.join()
    os.close(write)
    _, status = os.waitpid(pid, 0)
    seen = os.read(read, 64).decode()
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    assert seen == "12"  # the child's own copy
    assert counter.get_count(nocache=True) == 2  # none of it reached the parent


def test_the_sample_apps_tests_run_on_memory_with_no_backend_on_the_path() -> None:
    """examples/likes runs here on memory:// with only Python on PATH: no gcloud, Java,
    memcached or redis-server could be started. (CI runs the same tests, unchanged,
    on the real emulators: examples/ is in the suite's testpaths.)"""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("MEMCACHED_HOSTS", "DATASTORE_EMULATOR_HOST", "DATASTORE_DATASET")
    }
    env["PATH"] = str(Path(sys.executable).parent)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    started = time.monotonic()
    done = subprocess.run(
        [*command, "--sc-backend", "memory", str(REPO / "examples" / "likes")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "10 passed" in done.stdout, done.stdout[-2000:]
    print(f"examples/likes on memory://: {seconds:.1f} s, Python start-up included")


def test_the_plugins_memory_fixture_points_counters_made_earlier_at_memory(
    sharded_counter_memory_env: dict[str, str],
) -> None:
    assert sharded_counter_memory_env == {
        "SHARDED_COUNTER_CACHE_URL": "memory://",
        "SHARDED_COUNTER_DATASTORE_URL": "memory://firestore",
    }
    hits = Counter("hits")  # from the environment, as an app's own counters
    hits.increment(2)
    assert (hits.count, hits.get_count(nocache=True)) == (2, 2)
    assert [e["count"] for e in datastore_client().query(kind="CounterShard").fetch()] == [2]


@pytest.mark.backends
@pytest.mark.parametrize("datastore_url", ["memory://", "memory://classic"])
def test_a_memory_datastore_works_behind_a_real_cache(
    sharded_counter_cache: Any, datastore_url: str
) -> None:
    """``datastore_url`` and ``cache_url`` are independent: the in-memory Datastore behind
    the run's real cache server (memcached, Redis or a Redis Cluster, as ``--sc-cache``
    says). The cache holds the records and the stash; flushing it loses nothing that
    had reached the shards."""
    name = f"behind-real-{uuid.uuid4().hex[:8]}"
    counter = Counter(
        name, shards=4, cache_url=sharded_counter_cache.url, datastore_url=datastore_url
    )
    increment_from_threads(counter)  # 8 threads, 50 each
    counter.increment(5, idempotency_key="once")
    counter.increment(5, idempotency_key="once")  # a redelivery: counted once
    counter.defer(3)  # into delayed_incr, on the real cache
    assert counter.count == 408  # its record now cached, on the real server only
    assert memory_cache("").get(counter._record_key) is None
    counter.write_pending()  # folded into a shard
    sharded_counter_cache.flush_all()
    assert (counter.get_count(nocache=True), counter.count) == (408, 408)
