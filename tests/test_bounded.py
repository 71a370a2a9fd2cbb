"""BoundedCounter: totals that never leave their bounds, on both engines and real memcached.

Every test runs once per Datastore engine against the real emulator and real
memcached; the racing writers of the two-process test are real processes
(spawned). The fault test at the end uses the relay of tests/faultkit.py to
lose replies (a real emulator applies the commits) and SIGSTOPs the emulator.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from faultkit import ReplyHoldingRelay, probe_through_relay, writers_running

from sharded_counter import (
    BoundedCounter,
    CacheUnavailable,
    Counter,
    DatastoreUnavailable,
    IncrementNotRecorded,
    IncrementOutcomeUnknown,
    LimitReached,
)
from sharded_counter.store.escrow import BOUNDS_KIND
from sharded_counter_emulator import datastore_client

pytestmark = pytest.mark.backends


def bounds_entity_exists(name: str) -> bool:
    client = datastore_client()
    return client.get(client.key(BOUNDS_KIND, f"0:{name}")) is not None


def test_the_documented_usage(sharded_counter_env: dict[str, str]) -> None:
    seats = BoundedCounter("seats", maximum=3)
    seats.increment()
    seats.increment(2)
    with pytest.raises(LimitReached) as refused:
        seats.increment()
    assert (refused.value.delta, refused.value.maximum, refused.value.minimum) == (1, 3, None)
    assert seats.try_increment() is False
    assert seats.count == 3
    seats.increment(-1)  # a seat released
    assert seats.try_increment() is True
    assert seats.get_count(nocache=True) == 3
    with pytest.raises(LimitReached):
        seats.count = 4  # refused outside the bounds, nothing written
    seats.count = 1
    assert seats.count == 1
    seats.set_bounds(maximum=5)  # a plan upgrade: the total stays
    assert (seats.maximum, seats.count) == (5, 1)
    for _ in range(4):
        seats.increment()
    assert not seats.try_increment()
    assert BoundedCounter("seats", maximum=5).count == 5
    assert seats.delete() > 0
    assert not bounds_entity_exists("seats")
    assert BoundedCounter("seats", maximum=2).count == 0  # laid out afresh


def test_the_docs_example_runs(
    sharded_counter_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "using.md").read_text(encoding="utf-8")
    section = page.split("## Bounded counters", 1)[1].split("\n#", 1)[0]
    source = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(source, "docs/using.md", "exec"), namespace)
    assert capsys.readouterr().out == "3\n"
    seats = namespace["seats"]
    assert (seats.count, seats.get_count(nocache=True), seats.maximum) == (4, 4, 5)
    assert namespace["Stock"]("widgets").minimum == 0


def test_the_readme_example_runs(sharded_counter_env: dict[str, str]) -> None:
    page = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = page.split("### Bounded counters", 1)[1].split("\n#", 1)[0]
    source = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(source, "README.md", "exec"), namespace)
    assert namespace["quota"].get_count(nocache=True) == 100


def test_bounds_as_class_attributes_and_a_stock_that_never_goes_negative(
    sharded_counter_env: dict[str, str],
) -> None:
    class Stock(BoundedCounter):
        minimum = 0
        shards = 4

    stock = Stock("widgets")
    assert (stock.minimum, stock.maximum, stock.shards) == (0, None, 4)
    stock.count = 50
    taken = 0
    lock = threading.Lock()

    errors: list[BaseException] = []

    def take() -> None:
        nonlocal taken
        try:
            while stock.try_increment(-1):
                with lock:
                    taken += 1
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=take) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert taken == 50
    assert stock.get_count(nocache=True) == 0 == stock.count
    assert [room_down for _, _, _, room_down in stock.shares()] == [0] * 4


def test_a_lone_writer_on_20_shards_reaches_the_maximum_exactly(
    sharded_counter_env: dict[str, str],
) -> None:
    counter = BoundedCounter("quota", maximum=300, shards=20)
    for n in range(300):
        assert counter.try_increment(), f"increment {n + 1} of 300 was refused"
    with pytest.raises(LimitReached):
        counter.increment()
    assert counter.get_count(nocache=True) == 300
    shares = counter.shares()
    assert len(shares) == 20 and sum(count for _, count, _, _ in shares) == 300
    assert all(room_up == 0 for _, _, room_up, _ in shares)
    assert counter.stats.snapshot()["borrows"] > 0  # it had to borrow to get there


def test_bad_input_is_refused_before_anything_is_written(
    sharded_counter_env: dict[str, str],
) -> None:
    with pytest.raises(ValueError, match="greater than maximum"):
        BoundedCounter("bad", minimum=5, maximum=4)
    with pytest.raises(TypeError, match="maximum must be an int"):
        BoundedCounter("bad", maximum=2.5)
    with pytest.raises(TypeError, match="minimum must be an int"):
        BoundedCounter("bad", minimum=True)
    with pytest.raises(ValueError, match="64-bit"):
        BoundedCounter("bad", maximum=2**63)
    small = BoundedCounter("bad", minimum=0, maximum=10)
    with pytest.raises(ValueError, match="can never fit"):
        small.increment(11)
    with pytest.raises(ValueError, match="cannot join"):
        small.increment(1, transaction=datastore_client().transaction())
    with pytest.raises(TypeError, match="defer"):
        small.defer(1)
    with pytest.raises(TypeError, match="pending"):
        small.write_pending()
    with pytest.raises(ValueError, match="1 to 400 shards"):
        small.set_bounds(0, 10, shards=0)
    assert not bounds_entity_exists("bad")
    assert Counter("bad").get_count(nocache=True) == 0


def test_a_plain_counter_becomes_bounded_only_within_the_bounds(
    sharded_counter_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    plain = Counter("visits", shards=3)
    plain.increment(7)
    with pytest.raises(LimitReached, match="a total of 7"):
        BoundedCounter("visits", maximum=5).increment()
    assert not bounds_entity_exists("visits")
    assert plain.get_count(nocache=True) == 7  # nothing was written

    bounded = BoundedCounter("visits", maximum=10, shards=4)
    bounded.increment(3)
    assert not bounded.try_increment()
    assert bounded.get_count(nocache=True) == 10
    assert bounded.shards == 4
    # An object made with other bounds follows the stored ones, and says so once.
    with caplog.at_level(logging.WARNING, logger="sharded_counter"):
        other = BoundedCounter("visits", maximum=20)
        assert not other.try_increment()
        assert not other.try_increment()
    told = [r for r in caplog.records if "the stored ones hold" in r.getMessage()]
    assert len(told) == 1
    assert bounded.get_count(nocache=True) == 10


def test_changing_the_bounds_and_shards_under_writers_stays_within_them(
    sharded_counter_env: dict[str, str],
) -> None:
    """8 threads take units while the maximum goes 100 -> 60 -> 200 and the shard count
    5 -> 12; every read stays within the bounds in force, and the total is exact."""
    admin = BoundedCounter("plan", maximum=100, shards=5)
    admin.count = 40
    acked, refused, errors = [0], [0], []
    lock = threading.Lock()
    stop = threading.Event()

    def writer() -> None:
        counter = BoundedCounter("plan", maximum=100, shards=5)  # follows the changes
        while not stop.is_set():
            try:
                ok = counter.try_increment()
            except Exception as exc:  # reported by the assertion below
                errors.append(exc)
                return
            with lock:
                if ok:
                    acked[0] += 1
                else:
                    refused[0] += 1

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        lowered = False
        try:
            admin.set_bounds(maximum=60)
            lowered = True
        except LimitReached:
            pass  # the writers had passed 60 already: refused, nothing written
        time.sleep(0.5)
        admin.set_bounds(maximum=200, shards=12)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert errors == []
    total = admin.get_count(nocache=True)
    assert total == 40 + acked[0] <= 200
    assert admin.shards == 12 and len(admin.shares()) == 12
    if lowered:
        assert refused[0] > 0


def test_an_idempotency_key_counts_once_and_is_refused_like_any_increment(
    sharded_counter_env: dict[str, str],
) -> None:
    counter = BoundedCounter("credits", maximum=10)
    counter.increment(6, idempotency_key="order-1")
    counter.increment(6, idempotency_key="order-1")  # a redelivery: counts nothing
    assert counter.get_count(nocache=True) == 6
    with pytest.raises(LimitReached):
        counter.increment(6, idempotency_key="order-2")
    counter.increment(4, idempotency_key="order-2")  # another delta under a fresh key
    assert counter.get_count(nocache=True) == 10
    assert not counter.try_increment(1, idempotency_key="order-3")


def _racer(name: str, threads: int, calls: int, ready: Any, start: Any, out: Any) -> None:
    """One process of the race: ``threads`` threads, ``calls`` increments of 1 each."""
    counter = BoundedCounter(name, maximum=1500, shards=20)
    counter.get_count(nocache=True)  # connected before the start
    ready.release()
    start.wait()
    tally = {"acked": 0, "refused": 0, "errors": []}
    lock = threading.Lock()

    def write() -> None:
        for _ in range(calls):
            try:
                counter.increment()
                key = "acked"
            except LimitReached:
                key = "refused"
            except Exception as exc:  # reported, so the test fails with it
                with lock:
                    tally["errors"].append(repr(exc))  # type: ignore[union-attr]
                continue
            with lock:
                tally[key] += 1  # type: ignore[operator]

    workers = [threading.Thread(target=write) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put(tally)


def test_two_processes_race_2000_increments_for_1500_units(
    sharded_counter_env: dict[str, str],
    sharded_counter_cache: Any,
    sharded_counter_engine: str,
) -> None:
    name = "tickets"
    BoundedCounter(name, maximum=1500, shards=20).count = 0  # laid out before the race
    context = multiprocessing.get_context("spawn")
    ready, start, out = context.Semaphore(0), context.Event(), context.Queue()
    racers = [
        context.Process(target=_racer, args=(name, 8, 125, ready, start, out)) for _ in range(2)
    ]
    for racer in racers:
        racer.start()
    try:
        for _ in racers:
            assert ready.acquire(timeout=90)
        began = time.monotonic()
        start.set()
        tallies = [out.get(timeout=300) for _ in racers]
        seconds = time.monotonic() - began
    finally:
        for racer in racers:
            racer.join(30)
            if racer.is_alive():
                racer.terminate()
    errors = [e for t in tallies for e in t["errors"]]
    acked = sum(t["acked"] for t in tallies)
    refused = sum(t["refused"] for t in tallies)
    print(f"\nrace[{sharded_counter_engine}]: {acked} acked, {refused} refused in {seconds:.1f}s")
    assert errors == []
    assert (acked, refused) == (1500, 500)
    counter = BoundedCounter(name, maximum=1500)
    assert counter.get_count(nocache=True) == 1500 == counter.count
    sharded_counter_cache.flush_all()
    assert counter.count == 1500
    assert not counter.try_increment()


# -- faults ------------------------------------------------------------------------------


@pytest.mark.one_cache_server
def test_no_read_leaves_the_bounds_through_lost_replies_a_stall_and_a_memcached_kill(
    sharded_counter_env: dict[str, str],
    sharded_counter_backends: Any,
    sharded_counter_engine: str,
    sharded_counter_cache: Any,
    own_memcache: Any,
    relay: ReplyHoldingRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """8 writers press on the maximum of a stock in [0, 200] while, in turn, the
    relay holds the emulator's replies past the timeout (the real emulator applies
    the commits: lost replies), memcached is SIGKILLed and restarted, and the
    emulator's JVM is SIGSTOPped. Readers (cached and uncached) never see a total
    outside the bounds, and the total ends as acknowledged, give or take only the
    increments whose outcome the writers were told is unknown."""
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
    probe_through_relay()
    options = {
        "minimum": 0,
        "maximum": 200,
        "shards": 8,
        "rpc_timeout": 1.0,
        "retry_deadline": 5.0,
        "memcache_timeout": 0.2,
        "memcache_connect_timeout": 0.2,
    }
    admin = BoundedCounter("stock-faults", memcache_client=own_memcache(), **options)
    admin.count = 196
    lock = threading.Lock()
    tally = {"acked": 196, "calls": 0, "limit": 0, "not_recorded": 0}
    unknown: list[int] = []
    errors: list[BaseException] = []
    reads: list[int] = []

    writers: list[BoundedCounter] = []

    def writer(i: int, stop: threading.Event) -> None:
        counter = BoundedCounter("stock-faults", memcache_client=own_memcache(), **options)
        writers.append(counter)
        rng = random.Random(i)
        while not stop.is_set():
            delta = rng.choice((-2, -1, 1, 2, 3, 3))  # pressing on the maximum
            try:
                counter.increment(delta)
                key = "acked"
            except LimitReached:
                key, delta = "limit", 1
            except IncrementNotRecorded:
                key, delta = "not_recorded", 1
            except IncrementOutcomeUnknown:
                with lock:
                    unknown.append(delta)
                continue
            except Exception as exc:  # reported by the assertion below
                with lock:
                    errors.append(exc)
                return
            with lock:
                tally[key] += delta
                tally["calls"] += 1

    def reader(i: int, stop: threading.Event) -> None:
        counter = BoundedCounter("stock-faults", memcache_client=own_memcache(), **options)
        while not stop.is_set():
            try:
                value = counter.get_count(nocache=bool(i % 2))
            except (DatastoreUnavailable, CacheUnavailable):
                continue  # no value to check while a backend is out
            with lock:
                reads.append(value)
            time.sleep(0.02)

    emulator = sharded_counter_backends.emulator(sharded_counter_engine)
    # Each Datastore fault lasts 3 s against a 1 s rpc_timeout: every attempt begun in
    # its first 2 s times out. At 1.5 s only those of its first 0.5 s did, and with
    # bounded writers this slow near the maximum (about 14 calls a second in all) a
    # run could meet none (seen in CI: "no write attempt met a fault").
    with writers_running(8, writer), writers_running(2, reader):
        time.sleep(0.8)
        relay.hold.set()  # replies lost: commits land, callers time out
        time.sleep(3.0)
        relay.hold.clear()
        time.sleep(0.8)
        sharded_counter_cache.kill()
        time.sleep(1.0)
        sharded_counter_cache.start()
        time.sleep(0.8)
        emulator.pause()
        try:
            time.sleep(3.0)
        finally:
            emulator.resume()
        time.sleep(1.0)
    assert errors == []
    outside = [v for v in reads if not 0 <= v <= 200]
    total = admin.get_count(nocache=True)
    excess = total - tally["acked"]
    failed_attempts = sum(w.stats.snapshot()["transient_errors"] for w in writers)
    print(
        f"\nbounded-faults[{sharded_counter_engine}]: {len(reads)} reads, {tally}, "
        f"{len(unknown)} unknown, {failed_attempts} attempts failed, total {total}, "
        f"excess {excess}"
    )
    # A write met a fault if an attempt of it failed, or if it ended of unknown outcome.
    assert failed_attempts + len(unknown) > 0, "setup: no write attempt met a fault"
    assert len(reads) > 50 and outside == []
    assert 0 <= total <= 200
    assert sum(d for d in unknown if d < 0) <= excess <= sum(d for d in unknown if d > 0)
    assert tally["calls"] > 20  # the writers went on through the faults
    assert tally["limit"] > 0  # and met the maximum
