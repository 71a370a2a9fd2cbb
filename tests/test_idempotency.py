"""Idempotency keys (store/keyed.py): the first increment with a key counts, later ones don't.

Every test runs once per Datastore engine against the real emulator and real
memcached (``sharded_counter_env`` wipes both first). Fault tests for keyed increments
(lost replies, several processes, memcache flushed) are in test_exactly_once.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from faultkit import connected
from google.cloud import datastore

from sharded_counter import Counter, IncrementNotRecorded
from sharded_counter.core.keys import IDEMPOTENCY_KIND, idempotency_record_name
from sharded_counter.core.validation import check_idempotency_key
from sharded_counter.store.keyed import MAX_KEYS_PER_WRITE, KeyedShardStore
from sharded_counter_emulator import datastore_client, free_port

pytestmark = pytest.mark.backends


def records_of(name: str) -> dict[str, datastore.Entity]:
    """The key records of counter ``name``, by idempotency key (read past every cache)."""
    client = datastore_client()
    found = client.query(kind=IDEMPOTENCY_KIND).fetch()
    return {e["key"]: e for e in found if e["counter"] == name}


def test_a_key_counts_once_and_later_calls_count_nothing(
    sharded_counter_env: dict[str, str],
) -> None:
    counter = Counter("keyed", shards=5)
    counter.increment(5, idempotency_key="msg-1")
    counter.increment(5, idempotency_key="msg-1")  # a redelivery: returns, counts nothing
    counter.increment(7, idempotency_key="msg-1")  # even with another delta
    counter.increment(2, idempotency_key="msg-2")
    counter.increment(1)  # unkeyed increments are unaffected
    assert counter.count == 8
    assert counter.get_count(nocache=True) == 8
    assert counter.stats.snapshot()["keys_applied"] == 2
    records = records_of("keyed")
    assert sorted(records) == ["msg-1", "msg-2"]
    assert records["msg-1"]["delta"] == 5
    ttl_left = records["msg-1"]["expire_at"].timestamp() - time.time()
    assert 86400 - 60 < ttl_left <= 86400  # the default idempotency_ttl: a day


def test_the_same_key_on_another_counter_is_another_increment(
    sharded_counter_env: dict[str, str],
) -> None:
    a, b = Counter("a"), Counter("b")
    a.increment(3, idempotency_key="k")
    b.increment(4, idempotency_key="k")
    a.increment(3, idempotency_key="k")
    assert (a.count, b.count) == (3, 4)


def test_a_key_is_remembered_by_a_fresh_process_after_memcache_is_flushed(
    sharded_counter_env: dict[str, str], sharded_counter_cache: Any
) -> None:
    Counter("flushed").increment(9, idempotency_key="once")
    sharded_counter_cache.flush_all()
    # A new Counter stands for another process: nothing it could know but Datastore.
    Counter("flushed").increment(9, idempotency_key="once")
    assert Counter("flushed").get_count(nocache=True) == 9


def test_a_zero_delta_still_claims_its_key(sharded_counter_env: dict[str, str]) -> None:
    counter = Counter("zero")
    counter.increment(0, idempotency_key="z")
    counter.increment(5, idempotency_key="z")
    assert counter.get_count(nocache=True) == 0
    assert sorted(records_of("zero")) == ["z"]


def test_concurrent_deliveries_of_one_key_count_once(sharded_counter_env: dict[str, str]) -> None:
    """16 threads deliver each of 40 keys at the same moment, through group commit."""
    counter = Counter("racing", shards=20)
    start, errors = threading.Barrier(16), []

    def deliver() -> None:
        try:
            start.wait()
            for i in range(40):
                counter.increment(i + 1, idempotency_key=f"m{i}")
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    expected = sum(range(1, 41))
    assert counter.get_count(nocache=True) == expected
    assert counter.count == expected
    assert counter.stats.snapshot()["keys_applied"] == 40


def test_keys_with_a_caller_transaction(sharded_counter_env: dict[str, str]) -> None:
    """The key's record is read and staged in the caller's transaction: written by its
    commit with everything else, or not at all."""
    counter = Counter("joined", shards=4)
    client = datastore_client()
    with client.transaction() as txn:
        counter.increment(5, transaction=txn, idempotency_key="order-1")
        counter.increment(5, transaction=txn, idempotency_key="order-1")  # staged once
        counter.increment(2, transaction=txn, idempotency_key="order-2")
    assert counter.get_count(nocache=True) == 7
    with client.transaction() as txn:
        counter.increment(5, transaction=txn, idempotency_key="order-1")  # recorded already
    counter.increment(2, idempotency_key="order-2")  # the plain path sees the record too
    assert counter.get_count(nocache=True) == 7

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), client.transaction() as txn:
        counter.increment(4, transaction=txn, idempotency_key="order-3")
        raise Rollback
    counter.increment(4, idempotency_key="order-3")  # the rolled-back key was never recorded
    assert counter.get_count(nocache=True) == 11
    assert sorted(records_of("joined")) == ["order-1", "order-2", "order-3"]


def test_a_key_applied_before_a_set_stays_applied(sharded_counter_env: dict[str, str]) -> None:
    """``count = v`` replaces what was counted, and keys stay remembered: a message that
    was counted before the set counts nothing when it is delivered again after it."""
    counter = Counter("set-then-replay")
    counter.increment(5, idempotency_key="m")
    counter.count = 100
    counter.increment(5, idempotency_key="m")
    assert counter.get_count(nocache=True) == 100
    counter.delete()  # delete resets the total too, and keys stay remembered as well
    counter.increment(5, idempotency_key="m")
    assert counter.get_count(nocache=True) == 0


@pytest.mark.parametrize(
    ("key", "error", "message"),
    [
        (b"bytes", TypeError, "must be a str"),
        (7, TypeError, "must be a str"),
        ("", ValueError, "must not be empty"),
        ("x" * 1501, ValueError, "1501 bytes"),
        ("\ud800", ValueError, "not valid unicode"),
    ],
)
def test_bad_keys_are_refused_before_anything_is_written(
    sharded_counter_env: dict[str, str], key: Any, error: type[Exception], message: str
) -> None:
    counter = Counter("bad-keys")
    with pytest.raises(error, match=message):
        counter.increment(1, idempotency_key=key)
    client = datastore_client()
    with pytest.raises(error, match=message), client.transaction() as txn:
        counter.increment(1, transaction=txn, idempotency_key=key)
    assert counter.get_count(nocache=True) == 0
    assert records_of("bad-keys") == {}


def test_the_longest_key_and_a_long_name_fit(sharded_counter_env: dict[str, str]) -> None:
    name = "n" * 1500
    key = "é" * 750  # 1,500 bytes of UTF-8
    assert check_idempotency_key(key) == key
    assert idempotency_record_name(name, key).startswith("#")  # hashed: past 1,500 bytes
    counter = Counter(name)
    counter.increment(3, idempotency_key=key)
    counter.increment(3, idempotency_key=key)
    assert counter.get_count(nocache=True) == 3


def test_expired_keys_are_purged_where_no_ttl_policy_runs(
    sharded_counter_env: dict[str, str],
) -> None:
    old = Counter("short-lived", idempotency_ttl=60)  # long enough to outlast a slow run
    kept = Counter("long-lived")
    old.increment(1, idempotency_key="a")
    old.increment(1, idempotency_key="b")
    kept.increment(1, idempotency_key="a")
    keyed = KeyedShardStore(old._backend.store)
    assert keyed.purge_expired() == 0  # nothing has expired yet
    assert keyed.purge_expired(now=time.time() + 61) == 2
    assert sorted(records_of("short-lived")) == []
    assert sorted(records_of("long-lived")) == ["a"]
    old.increment(1, idempotency_key="a")  # forgotten: counts again
    kept.increment(1, idempotency_key="a")  # remembered: counts nothing
    assert (old.get_count(nocache=True), kept.get_count(nocache=True)) == (3, 1)


@pytest.mark.needs_processes
def test_a_keyed_increment_is_never_stashed(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Datastore unreachable (nothing listens at its address) an unkeyed increment
    is stashed in memcache; a keyed one raises IncrementNotRecorded, because its record
    must go to Datastore with it. Retrying with the key later counts it once."""
    healthy = Counter("unreachable", shards=3)
    healthy.increment(1)
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = connected(
            Counter(
                "unreachable",
                shards=3,
                write_mode=healthy.write_mode,  # no probe: the address is dead
                retry_attempts=2,
                retry_deadline=0.5,
                rpc_timeout=0.3,
            )
        )
    with pytest.raises(IncrementNotRecorded) as caught:
        broken.increment(4, idempotency_key="later")
    assert caught.value.delta == 4
    assert healthy._pending_stash() == 0
    broken.increment(2)  # unkeyed: stashed, acknowledged
    assert healthy._pending_stash() == 2
    healthy.increment(4, idempotency_key="later")
    healthy.increment(4, idempotency_key="later")
    # Both reads add what delayed_incr holds: the stashed 2 is counted, once.
    assert (healthy.count, healthy.get_count(nocache=True)) == (7, 7)


def test_the_docs_example_runs(sharded_counter_env: dict[str, str]) -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "using.md").read_text(encoding="utf-8")
    section = page.split("## Idempotency keys", 1)[1].split("\n#", 1)[0]
    source = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(source, "docs/using.md", "exec"), {})
    assert Counter("likes").get_count(nocache=True) == 3


def test_a_write_of_the_most_keys_a_group_holds_fits_one_transaction(
    sharded_counter_env: dict[str, str],
) -> None:
    # The shard and one key record per key, in one transaction: within the classic
    # Datastore's 25 entity groups.
    counter = Counter("widest-keyed-write", shards=3)
    keys = {f"wide-{i}": 1 for i in range(MAX_KEYS_PER_WRITE)}
    assert counter._ctx.run(counter._paths.keyed.write(keys)) == {}
    assert counter.get_count(nocache=True) == MAX_KEYS_PER_WRITE


def test_forty_threads_of_keyed_increments_are_all_recorded(
    sharded_counter_env: dict[str, str],
) -> None:
    # One write in flight and 39 keys queued behind it: the groups must stay within
    # what one transaction can take, or whole groups are refused.
    counter = Counter("many-keyed-writers", shards=5)
    failures: list[BaseException] = []

    def deliver(worker: int) -> None:
        for i in range(15):
            try:
                counter.increment(1, idempotency_key=f"w{worker}-{i}")
            except Exception as exc:  # the assertion below shows them
                failures.append(exc)

    threads = [threading.Thread(target=deliver, args=(w,)) for w in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert counter.get_count(nocache=True) == 40 * 15
    assert counter.count == 40 * 15
