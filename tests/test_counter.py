"""The Counter API of the tipfy document, end to end on both Datastore engines and memcached.

Every test here runs once per engine (classic emulator, Firestore emulator in
Datastore mode) against real processes; ``sharded_counter_env`` points the
environment at them and wipes both before each test.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from faultkit import connected
from google.cloud import datastore

from sharded_counter import Counter, IncrementNotRecorded, config
from sharded_counter.cache.redis.client import RedisClient
from sharded_counter.core.keys import SHARD_KIND
from sharded_counter_emulator import datastore_client, free_port

pytestmark = pytest.mark.backends


def shard_entities(name: str) -> list[datastore.Entity]:
    client = datastore_client()
    query = client.query(kind=SHARD_KIND)
    query.add_filter(filter=datastore.query.PropertyFilter("name", "=", name))
    return list(query.fetch())


def test_the_documented_usage(sharded_counter_env: dict[str, str]) -> None:
    hits = Counter("hits")
    hits.increment()
    hits.increment(10)
    hits.increment(-3)
    assert hits.count == 8
    assert hits.get_count(nocache=True) == 8
    hits.count = 6
    assert hits.count == 6
    assert hits.get_count(nocache=True) == 6
    assert isinstance(hits.count, int)


def test_shard_counts_from_class_and_config(sharded_counter_env: dict[str, str]) -> None:
    class MyCounter(Counter):
        shards = 20

    assert Counter("plain").shards == 10
    assert MyCounter("mine").shards == 20
    config["sharded_counter"] = {"shards": 3}
    assert Counter("plain").shards == 3
    assert MyCounter("mine").shards == 20  # the class attribute wins over config

    counter = Counter("spread", shards=3)
    for _ in range(60):
        counter.increment()
    entities = shard_entities("spread")
    assert 1 < len(entities) <= 3
    assert sum(e["count"] for e in entities) == 60
    assert {e.key.name for e in entities} <= {"0:spread", "1:spread", "2:spread"}


def test_shards_means_the_shard_count_on_the_class_and_on_a_counter(
    sharded_counter_env: dict[str, str],
) -> None:
    """One meaning: the number of shards new increments are spread over, whether read
    on a class (what its counters get) or on a counter (what is in force)."""

    class MyCounter(Counter):
        shards = 20

    assert (Counter.shards, MyCounter.shards) == (10, 20)
    config["sharded_counter"] = {"shards": 3}
    assert (Counter.shards, MyCounter.shards) == (3, 20)
    assert MyCounter("mine", shards=5).shards == 5  # a keyword wins over the class
    with pytest.warns(DeprecationWarning, match="shard_count"):
        assert Counter("plain").shard_count == 3


def test_counts_survive_a_cache_flush_and_go_negative(
    sharded_counter_env: dict[str, str], sharded_counter_cache: Any
) -> None:
    counter = Counter("down")
    counter.increment(-5)
    assert counter.count == -5
    sharded_counter_cache.flush_all()
    assert counter.count == -5  # rebuilt from the shards
    counter.increment(2)
    assert counter.count == -3
    assert counter.get_count(nocache=True) == -3


def test_a_cached_total_follows_writes_from_other_counter_objects(
    sharded_counter_env: dict[str, str],
) -> None:
    reader, writer = Counter("shared"), Counter("shared")
    assert reader.count == 0  # now cached
    writer.increment(7)
    assert reader.count == 7


def test_uncached_sum_counts_shards_written_by_anyone(sharded_counter_env: dict[str, str]) -> None:
    """Shards of the App Engine originals (or of an old shard count) are counted."""
    client = datastore_client()
    legacy = datastore.Entity(client.key(SHARD_KIND, "Shardhits3"))
    legacy.update({"name": "hits", "count": 40})
    client.put(legacy)
    counter = Counter("hits", shards=2)
    counter.increment(2)
    assert counter.get_count(nocache=True) == 42
    assert counter.count == 42
    counter.count = 5  # setting spreads the value over every shard, the old ones included
    assert counter.get_count(nocache=True) == 5
    assert sum(e["count"] for e in shard_entities("hits")) == 5


def test_many_threads_on_one_counter_are_exact(sharded_counter_env: dict[str, str]) -> None:
    counter = Counter("hot", shards=5)
    per_thread, threads = 10, 16
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(per_thread):
                counter.increment()
                # Readers race writers on the cached record; a total never exceeds the truth.
                assert 1 <= counter.count <= per_thread * threads
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert counter.get_count(nocache=True) == per_thread * threads
    assert counter.count == per_thread * threads


def test_delete_removes_shards_and_cached_entries(sharded_counter_env: dict[str, str]) -> None:
    counter = Counter("gone")
    counter.increment(3)
    assert counter.count == 3
    assert counter.delete() >= 1
    assert shard_entities("gone") == []
    assert counter.count == 0
    assert Counter("gone").count == 0


@pytest.mark.parametrize(
    ("bad", "error"),
    [(1.5, TypeError), ("3", TypeError), (None, TypeError), (True, TypeError), (2**63, ValueError)],
)
def test_bad_deltas_write_nothing(
    sharded_counter_env: dict[str, str], bad: Any, error: type
) -> None:
    counter = Counter("strict")
    with pytest.raises(error):
        counter.increment(bad)
    assert shard_entities("strict") == []


@pytest.mark.parametrize(
    ("name", "error"), [("", ValueError), (None, TypeError), ("x" * 1501, ValueError)]
)
def test_bad_names_are_refused(sharded_counter_env: dict[str, str], name: Any, error: type) -> None:
    with pytest.raises(error):
        Counter(name)


@pytest.mark.parametrize(
    "name", ["spaces and\nnewlines\x00", "__reserved__", "ünïcødé 🧮", "x" * 1500, "a1"]
)
def test_hostile_names_work(sharded_counter_env: dict[str, str], name: str) -> None:
    counter = Counter(name, shards=2)
    counter.increment(4)
    assert counter.count == 4
    assert counter.get_count(nocache=True) == 4
    if name == "a1":  # the original's key collision: 'a1' shard 1 vs 'a' shard 11
        other = Counter("a", shards=12)
        for _ in range(30):
            other.increment()
        assert counter.get_count(nocache=True) == 4


def test_without_memcache_every_read_sums_the_shards(sharded_counter_env: dict[str, str]) -> None:
    counter = Counter("nocache", memcached_hosts=())
    counter.increment(3)
    assert counter.count == 3
    assert counter.get_count(nocache=True) == 3


def dead_datastore(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point new clients at a port where nothing listens: a Datastore that is down."""
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")


FAST_FAIL = {"retry_attempts": 2, "retry_deadline": 1.0, "rpc_timeout": 0.5}


@pytest.mark.needs_processes
def test_failed_writes_are_stashed_and_folded_into_the_next_write(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    live = Counter("stash")
    live.increment(1)
    assert live.count == 1
    with monkeypatch.context() as patch:
        dead_datastore(patch)
        broken = connected(Counter("stash", **FAST_FAIL))
        broken.increment(5)  # acknowledged: it went to delayed_incr
        broken.increment(-2)
        assert broken.stats.snapshot()["stashed"] == 2
    assert live.count == 4  # the cached total includes the stash
    assert live.get_count(nocache=True) == 4  # and so does the shard sum
    live.increment(10)  # folds the stash into this shard write
    assert live.stats.snapshot()["folded"] == 1
    assert sum(e["count"] for e in shard_entities("stash")) == 14
    assert live.count == 14


@pytest.mark.needs_processes
def test_write_failing_with_memcache_down_raises(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dead_datastore(monkeypatch)
    counter = Counter(
        "lost", memcached_hosts=[f"127.0.0.1:{free_port()}"], memcache_timeout=0.2, **FAST_FAIL
    )
    with pytest.raises(IncrementNotRecorded) as caught:
        counter.increment(3)
    assert caught.value.delta == 3
    assert "not recorded" in str(caught.value)


def test_increment_joins_the_callers_transaction(sharded_counter_env: dict[str, str]) -> None:
    client = datastore_client()
    counter = Counter("orders")
    counter.increment(1)
    assert counter.count == 1  # cached before the transaction
    order = datastore.Entity(client.key("Order", "o-1"))
    order["total"] = 99
    with client.transaction() as txn:
        txn.put(order)
        counter.increment(2, transaction=txn)
        counter.increment(3, transaction=txn)  # both stage on one shard entity
        assert counter.get_count(nocache=True) == 1  # nothing visible before the commit
    assert client.get(order.key) is not None
    assert counter.count == 6  # the cache was refreshed after the commit
    assert counter.get_count(nocache=True) == 6


def test_a_rolled_back_transaction_counts_nothing(sharded_counter_env: dict[str, str]) -> None:
    client = datastore_client()
    counter = Counter("orders")
    assert counter.count == 0

    class Abandon(Exception):
        pass

    with pytest.raises(Abandon), client.transaction() as txn:
        txn.put(datastore.Entity(client.key("Order", "o-2")))
        counter.increment(5, transaction=txn)
        raise Abandon
    assert client.get(client.key("Order", "o-2")) is None
    assert counter.count == 0
    assert counter.get_count(nocache=True) == 0


def test_joining_needs_a_live_datastore_transaction(sharded_counter_env: dict[str, str]) -> None:
    counter = Counter("orders")
    with pytest.raises(TypeError):
        counter.increment(1, transaction=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not in progress"):
        counter.increment(1, transaction=datastore_client().transaction())
    assert shard_entities("orders") == []


@pytest.mark.needs_processes
def test_verify_finds_drift_and_repair_rebuilds_from_the_truth(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = Counter("audited", shards=1)
    counter.increment(5)
    assert counter.count == 5
    assert counter.verify().ok
    # Change the shard behind the cache's back, as another tool might.
    client = datastore_client()
    (entity,) = shard_entities("audited")
    entity["count"] = 9
    client.put(entity)
    report = counter.verify()
    assert (report.cached, report.shards, report.stale_shards, report.drift) == (5, 9, 1, -4)
    assert not report.ok
    with monkeypatch.context() as patch:  # leave a pending stash for repair to write
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        Counter("audited", shards=1, **FAST_FAIL).increment(2)
    repaired = counter.repair()
    assert repaired.ok
    assert (repaired.cached, repaired.shards, repaired.pending) == (11, 11, 0)
    assert counter.count == 11


def test_the_cache_is_the_one_this_run_names(
    sharded_counter_env: dict[str, str], pytestconfig: pytest.Config
) -> None:
    """``--sc-cache redis`` runs this file with Redis as the cache: make sure it is."""
    counter = Counter("which-cache")
    counter.increment(2)
    on_redis = isinstance(counter._backend.cache._calls.client, RedisClient)
    assert on_redis == (pytestconfig.getoption("--sc-cache") == "redis")
    assert counter.count == counter.get_count(nocache=True) == 2
