"""Exactness of the counter while a standalone Redis, the cache, misbehaves.

The counterpart of ``test_faults.py``'s memcached cases, with a redis-server of each
test's own (``emulator.redis_server.RedisServer``) named by ``cache_url``: killed
(SIGKILL) under writers and left down, paused (SIGSTOP) past the client's timeout,
restarted with and without persistence, filled to ``maxmemory``, and brought back
in an older state (an RDB snapshot older than its last writes, as a promoted
replica can be). Every test that writes runs once per Datastore engine, against
the real emulator. Nothing here is faked.

Each keeps a ledger of what callers were told (``faultkit.Ledger``): an increment
whose ``increment()`` returned is acknowledged and must be in the shards; what the
cache alone held (``delayed_incr``: a stashed failed write, a ``SharedBuffer``
amount) is lost exactly when Redis loses the key, and counted twice when Redis
brings back a state from before it was written to Datastore; the tests assert
both to the unit, as docs/limits.md states them.

Run with ``-s`` to see the measured numbers (lines starting ``[faults]``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from faultkit import Ledger, connected, increment_loop, report, writers_running

from sharded_counter import CacheUnavailable, Counter, SharedBuffer
from sharded_counter.cache.redis.client import RedisClient
from sharded_counter.cache.redis.commands import CacheTimedOut
from sharded_counter_emulator import free_port
from sharded_counter_emulator.redis_server import Persistence, RedisServer

pytestmark = pytest.mark.backends

WRITERS = 16

# Redis calls bounded tightly, so an outage costs little per call (as test_faults.py
# bounds memcached's).
FAST_CACHE: dict[str, Any] = {"memcache_timeout": 0.2, "memcache_connect_timeout": 0.2}
# A Datastore that is down: no retries worth waiting for, and quick to say so.
UNREACHABLE: dict[str, Any] = {"retry_attempts": 1, "retry_deadline": 0.3, "rpc_timeout": 0.3}

# How long to wait for progress that a healthy run makes in well under a second; a
# loaded 2-core machine may be many times slower, and a wait that runs out fails the
# test with the message saying what did not happen.
PROGRESS_TIMEOUT = 60.0


def wait_for(done: Callable[[], bool], what: str, timeout: float = PROGRESS_TIMEOUT) -> None:
    """Poll ``done`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.02)


def wait_for_acks(ledger: Ledger, more: int, when: str) -> None:
    """Wait until ``more`` further increments are acknowledged."""
    target = ledger.acked_calls + more
    wait_for(lambda: ledger.acked_calls >= target, f"{more} increments acknowledged {when}")


def assert_totals(counter: Counter, expected: int) -> None:
    cached, uncached = counter.count, counter.get_count(nocache=True)
    assert (cached, uncached) == (expected, expected), (
        f"cached={cached} uncached={uncached} expected={expected}: "
        f"cached off by {cached - expected}, uncached off by {uncached - expected}"
    )


def fold_stash(counter: Counter, ledger: Ledger) -> None:
    """Write +1s until nothing is pending in the counter's stash (white-box look).

    The first write only notices a stash (its merge looks at it); a later one takes it.
    """
    deadline = time.monotonic() + PROGRESS_TIMEOUT
    ledger.increment(counter, 1)
    while counter._pending_stash() != 0:
        if time.monotonic() > deadline:
            pytest.fail(f"healthy writes did not fold the stash in {PROGRESS_TIMEOUT:.0f} s")
        ledger.increment(counter, 1)
        time.sleep(0.05)
    assert ledger.errors == [] and ledger.refused_calls == 0


def warnings_containing(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if r.name == "sharded_counter" and text in r.getMessage())


def cache_of(server: RedisServer) -> dict[str, Any]:
    """The options that put a counter's cache on ``server``."""
    return {"cache_url": server.url, **FAST_CACHE}


@pytest.fixture
def redis_server() -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers of this test's own (``make(persistence)``); stopped after it,
    paused or not (a stop continues a paused server first), their files deleted."""
    made: list[RedisServer] = []

    def make(persistence: Persistence = "none") -> RedisServer:
        server = RedisServer(persistence=persistence).start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


_keys = itertools.count()  # idempotency keys never repeat within a run: a repeat counts 0


def keyed_or_plain(ledger: Ledger, counter: Counter) -> Callable[[int, threading.Event], None]:
    """A writer body: one writer in four sends keyed increments (+2, a fresh key each),
    the others plain ones (+1)."""

    def body(i: int, stop: threading.Event) -> None:
        while not stop.is_set():
            if i % 4 == 0:
                ledger.increment(counter, 2, idempotency_key=f"k-{next(_keys)}")
            else:
                ledger.increment(counter, 1)

    return body


# -- 1. killed and left down, or paused past the timeout ------------------------------------


@pytest.mark.parametrize("outage", ["killed", "paused"])
def test_redis_down_or_stalled_under_writers_costs_no_increment(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    redis_server: Callable[..., RedisServer],
    caplog: pytest.LogCaptureFixture,
    outage: str,
) -> None:
    """Redis SIGKILLed (and left down) or SIGSTOPped under 16 writers, a quarter of them
    keyed: every increment is acknowledged (the cache is optional for a write that
    reaches Datastore), reads while it is out sum the shards exactly, a SharedBuffer
    refuses with CacheUnavailable (or writes directly, when told to); once Redis is
    back (empty, or resumed with stale replies on their way) the cached total is exact."""
    caplog.set_level(logging.WARNING, logger="sharded_counter")
    server = redis_server()
    cache = cache_of(server)
    counter = Counter(f"redis-{outage}", shards=10, rpc_timeout=2.0, **cache)
    ledger = Ledger()
    ledger.increment(counter, 5)
    assert counter.count == 5  # a complete record is cached before the outage

    paused = False
    try:
        with writers_running(WRITERS, keyed_or_plain(ledger, counter)):
            wait_for_acks(ledger, 20, "before the outage")
            began = time.monotonic()
            if outage == "killed":
                server.kill()
            else:
                server.pause()
                paused = True
            during = ledger.acked_calls
            wait_for_acks(ledger, 50, f"with Redis {outage}")
            # Past the client's 0.2 s timeout many times over, whatever the load.
            wait_for(lambda: time.monotonic() - began >= 1.5, "1.5 s of outage")
        during = ledger.acked_calls - during
        max_call = ledger.max_latency(since=began)
        assert ledger.errors == [] and ledger.refused_calls == 0, ledger.refusal_causes

        # Still out: every read sums the shards.
        read_began = time.monotonic()
        down_cached = counter.count
        down_read = time.monotonic() - read_began
        assert (down_cached, counter.get_count(nocache=True)) == (ledger.acknowledged,) * 2

        # A SharedBuffer keeps its amounts in the cache alone: with the cache out it
        # refuses (nothing kept), or writes through Counter.increment when told to.
        refusing = SharedBuffer(interval=600, **cache)
        with pytest.raises(CacheUnavailable):
            refusing.increment(counter.name, 1000)
        direct = SharedBuffer(interval=600, on_cache_failure="direct", rpc_timeout=2.0, **cache)
        direct.increment(counter.name, 7)
        ledger.add_events([(time.monotonic(), time.monotonic(), 7)])
        assert counter.get_count(nocache=True) == ledger.acknowledged
    finally:
        if outage == "killed":
            server.start()  # empty: nothing was persisted
        elif paused:
            server.resume()

    # Back: more concurrent writes, then the cached total must be exact again.
    with writers_running(WRITERS, keyed_or_plain(ledger, counter)):
        wait_for_acks(ledger, 50, "after Redis came back")
    assert ledger.errors == [] and ledger.refused_calls == 0
    assert_totals(counter, ledger.acknowledged)
    assert warnings_containing(caplog, "memcache is unavailable") >= 1
    assert warnings_containing(caplog, "memcache answers again") >= 1
    report(
        f"redis-{outage}[{sharded_counter_engine}]",
        increments=ledger.acked_calls,
        during_outage=during,
        max_call_s=max_call,
        read_while_down_s=down_read,
    )


# -- 2. stray replies after a pause -------------------------------------------------------


def test_a_call_that_timed_out_leaves_no_reply_for_the_next_call(
    redis_server: Callable[..., RedisServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write and a read time out against a paused server; what they sent is still
    queued there, so its replies come once it resumes. A pool of one connection makes
    the next call use the same connection object, and it is sent while the server is
    still paused, so its read would meet the first stray reply if the timed-out
    connection had been kept. It reads its own answer, and the timed-out write did
    land, as ``maybe_applied`` said it might.

    Checked against a mutant: with ``RedisClient._send``'s ``disconnect()`` removed
    and redis-py told not to drop a connection whose read failed
    (``disconnect_on_error=False``) this test fails; with either drop alone it passes
    (redis-py drops a timed-out connection itself; ours is the second guard)."""
    server = redis_server()
    client = RedisClient(
        server.host, server.port, timeout=2.0, connect_timeout=2.0, max_pool_size=1
    )
    try:
        assert client.add("mine", b"my value")
        assert client.get("mine") == b"my value"  # the one pooled connection is open
        server.pause()
        try:
            with pytest.raises(CacheTimedOut) as write:
                client.add("stray", b"late")
            # The read opens a new connection (the write's was dropped), whose handshake
            # times out: CacheNotReached, its GET never sent. Either way, not applied.
            with pytest.raises(CacheUnavailable) as read:
                client.get("mine")
            assert (write.value.maybe_applied, read.value.maybe_applied) == (True, False)

            # Tell when the next call has sent something (its command, or a handshake
            # on a new connection): only then let the server run.
            sent = threading.Event()
            original = redis.connection.AbstractConnection.send_command

            def spied(self: Any, *args: Any, **kwargs: Any) -> None:
                original(self, *args, **kwargs)
                sent.set()

            monkeypatch.setattr(redis.connection.AbstractConnection, "send_command", spied)
            answer: list[Any] = []

            def read_mine() -> None:
                try:
                    answer.append(client.get("mine"))
                except Exception as exc:  # a stray reply read as ours fails here
                    answer.append(exc)

            reading = threading.Thread(target=read_mine)
            reading.start()
            wait_for(sent.is_set, "the next call to send", timeout=30)
        finally:
            server.resume()
        reading.join(30)
        assert not reading.is_alive(), "the call after the resume did not return"
        assert answer == [b"my value"], f"the call after the resume read {answer!r}"
        monkeypatch.undo()
        wait_for(lambda: client.get("stray") is not None, "the timed-out add to land")
        assert client.get("stray") == b"late"
    finally:
        client.close()


# -- 3. restarted, with and without persistence ---------------------------------------------

# (persistence, how it goes down, whether delayed_incr is lost)
RESTARTS = [
    ("none", "kill", True),
    ("rdb", "kill", True),  # no snapshot yet: the save point is an hour away
    ("rdb", "restart", False),  # a clean shutdown writes a snapshot first
    ("aof-everysec", "kill", False),  # the stash was written 3 s before
    ("aof-always", "kill", False),
]


@pytest.mark.parametrize(
    ("persistence", "how", "loses"),
    RESTARTS,
    ids=[f"{p}-{h}" for p, h, _ in RESTARTS],
)
def test_a_redis_restart_loses_exactly_what_only_the_cache_held(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    redis_server: Callable[..., RedisServer],
    monkeypatch: pytest.MonkeyPatch,
    persistence: Persistence,
    how: str,
    loses: bool,
) -> None:
    """Before the restart, three increments whose Datastore write failed are stashed
    (acknowledged, +5 each), and a SharedBuffer holds +40 for another counter; 8
    writers keep a third counter busy across the restart. Without persistence (or
    with a snapshot older than the keys) the 15 and the 40 are lost exactly, nothing
    else: every acknowledged write that reached Datastore is counted and the cached
    totals are rebuilt. With an AOF (or a clean shutdown's snapshot) nothing is lost,
    and the next writes fold the stash in."""
    server = redis_server(persistence)
    cache = cache_of(server)
    busy = Counter("restart-busy", shards=10, rpc_timeout=2.0, **cache)
    stashed = Counter("restart-stashed", shards=4, rpc_timeout=2.0, **cache)
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = connected(Counter("restart-stashed", shards=4, **cache, **UNREACHABLE))
    buffer = SharedBuffer(interval=600, rpc_timeout=2.0, **cache)

    stash_ledger = Ledger()
    for _ in range(3):
        stash_ledger.increment(broken, 5)  # Datastore down, Redis up: stashed
    assert (stash_ledger.acknowledged, stash_ledger.refused_calls) == (15, 0)
    for _ in range(4):
        buffer.increment("restart-buffered", 10)
    stashed_at = time.monotonic()
    assert stashed.get_count(nocache=True) == 15  # no shard yet: all of it is the stash
    assert buffer.pending("restart-buffered") == 40

    ledger = Ledger()
    with writers_running(8, increment_loop(ledger, lambda i, k: busy, lambda i, k: 1)):
        wait_for_acks(ledger, 20, "before the restart")
        if persistence == "aof-everysec":
            # everysec fsyncs once a second, and may hold a write back from the file
            # while an fsync runs: 3 s old, the stash is well past that window.
            wait_for(lambda: time.monotonic() - stashed_at >= 3.0, "the stash to be 3 s old")
        down_at = time.monotonic()
        if how == "kill":
            server.kill()
            server.start()  # returns once it answers PING, its files loaded
        else:
            server.restart()
        back_in = time.monotonic() - down_at
        wait_for_acks(ledger, 20, "after the restart")
    assert ledger.errors == [] and ledger.refused_calls == 0

    # The busy counter: every acknowledged write is in Datastore, whatever Redis kept.
    with writers_running(8, increment_loop(ledger, lambda i, k: busy, lambda i, k: 1)):
        wait_for_acks(ledger, 20, "in the round after the restart")
    assert_totals(busy, ledger.acknowledged)

    # What only the cache held: all of it, or none of it.
    kept_stash = stashed.get_count(nocache=True)
    kept_buffer = buffer.pending("restart-buffered")
    expected = (0, 0) if loses else (15, 40)
    assert (kept_stash, kept_buffer) == expected, (
        f"{persistence} ({how}) kept {kept_stash} of the stashed 15 and {kept_buffer} of the "
        f"buffered 40; expected {expected}"
    )
    assert stashed.count == kept_stash  # the cached total agrees (rebuilt, or reloaded)

    # Whatever survived is folded into the shards by the next healthy writes, once.
    healthy_writes = Ledger()
    fold_stash(stashed, healthy_writes)
    buffer.flush("restart-buffered")
    assert_totals(stashed, kept_stash + healthy_writes.acknowledged)
    assert Counter("restart-buffered", **cache).get_count(nocache=True) == kept_buffer
    report(
        f"redis-restart-{persistence}-{how}[{sharded_counter_engine}]",
        lost_stash=15 - kept_stash,
        lost_buffered=40 - kept_buffer,
        busy_increments=ledger.acked_calls,
        back_in_s=back_in,
    )


# -- 4. full: what an eviction policy that spares keys without an expiry does --------------


def redis_info(server: RedisServer, field: str) -> int:
    """One integer field of ``INFO`` (e.g. ``evicted_keys``)."""
    client = redis.Redis(server.host, server.port)
    try:
        return int(client.info()[field])
    finally:
        client.close()


def configure(server: RedisServer, **settings: str) -> None:
    """``CONFIG SET`` each setting (``maxmemory_policy=...`` for ``maxmemory-policy``)."""
    client = redis.Redis(server.host, server.port)
    try:
        for name, value in settings.items():
            assert client.config_set(name.replace("_", "-"), value)
    finally:
        client.close()


def test_volatile_lru_evicts_cached_totals_never_the_stash_and_full_it_refuses_out_loud(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    redis_server: Callable[..., RedisServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under ``maxmemory-policy volatile-lru`` (Memorystore's default) Redis evicts only
    keys with an expiry: cached totals go, rebuilt from the shards on the next read;
    a stash (+15, acknowledged, its Datastore writes failed) and a SharedBuffer's +40
    have none and stay. With nothing evictable left, writes are refused: an increment
    that reaches Datastore is acknowledged all the same, one that cannot is refused
    with IncrementNotRecorded (not kept, nothing lost silently), and the SharedBuffer
    refuses with CacheUnavailable. Once Redis has room again every total is exact and
    the stash and buffer are written, once."""
    server = redis_server()
    configure(server, maxmemory_policy="volatile-lru")
    cache = cache_of(server)
    stashed = Counter("full-stashed", shards=4, rpc_timeout=2.0, **cache)
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = connected(Counter("full-stashed", shards=4, **cache, **UNREACHABLE))
    buffer = SharedBuffer(interval=600, rpc_timeout=2.0, **cache)
    stash_ledger = Ledger()
    for _ in range(3):
        stash_ledger.increment(broken, 5)
    for _ in range(4):
        buffer.increment("full-buffered", 10)
    assert (stash_ledger.acknowledged, stash_ledger.refused_calls) == (15, 0)

    # Twenty counters with a cached total each: keys with an expiry (cache_ttl).
    ledger = Ledger()
    cached = [Counter(f"full-cached-{i}", shards=2, rpc_timeout=2.0, **cache) for i in range(20)]
    for counter in cached:
        ledger.increment(counter, 3)
        assert counter.count == 3
    evicted_before = redis_info(server, "evicted_keys")

    # Below what it holds: the next command evicts every key with an expiry, and
    # what has none stays and fills it.
    configure(server, maxmemory="1")
    assert (stashed.get_count(nocache=True), buffer.pending("full-buffered")) == (15, 40)
    evicted = redis_info(server, "evicted_keys") - evicted_before
    assert evicted >= len(cached), f"only {evicted} keys evicted"

    # Full: writes that reach Datastore are acknowledged, and reads sum the shards.
    healthy = cached[0]
    for _ in range(5):
        ledger.increment(healthy, 1)
    assert (healthy.count, healthy.get_count(nocache=True)) == (8, 8)
    # A write that cannot reach Datastore cannot be stashed either: refused, not kept.
    refused = Ledger()
    refused.increment(broken, 5)
    assert (refused.acknowledged, refused.refused_calls, refused.refused) == (0, 1, 5)
    with pytest.raises(CacheUnavailable):
        buffer.increment("full-buffered", 1000)
    assert ledger.errors == [] and ledger.refused_calls == 0

    # Room again: nothing acknowledged is missing, nothing refused is counted.
    configure(server, maxmemory="0")
    for counter in cached[1:]:
        assert_totals(counter, 3)
    assert_totals(healthy, 8)
    healthy_writes = Ledger()
    fold_stash(stashed, healthy_writes)
    assert_totals(stashed, 15 + healthy_writes.acknowledged)
    buffer.flush("full-buffered")
    assert Counter("full-buffered", **cache).get_count(nocache=True) == 40
    report(
        f"redis-full-volatile-lru[{sharded_counter_engine}]",
        evicted_keys=evicted,
        kept_stash=15,
        kept_buffered=40,
    )


def test_noeviction_full_keeps_cached_totals_and_the_writer_reads_the_shards(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    redis_server: Callable[..., RedisServer],
) -> None:
    """Under ``noeviction`` (Redis's default) a full Redis keeps the cached totals it
    holds but takes no merge into them: the process that wrote reads its totals from
    the shards (exact), and once there is room they are exact everywhere."""
    server = redis_server()
    configure(server, maxmemory_policy="noeviction")
    cache = cache_of(server)
    counter = Counter("noeviction", shards=2, rpc_timeout=2.0, **cache)
    ledger = Ledger()
    for _ in range(3):
        ledger.increment(counter, 1)
    assert counter.count == 3
    configure(server, maxmemory="1")
    assert redis_info(server, "evicted_keys") == 0
    for _ in range(5):
        ledger.increment(counter, 1)
    assert ledger.errors == [] and ledger.refused_calls == 0
    full_read = counter.count
    assert (full_read, counter.get_count(nocache=True)) == (8, 8)
    configure(server, maxmemory="0")
    ledger.increment(counter, 1)
    assert_totals(counter, 9)
    assert Counter("noeviction", **cache).count == 9
    report(f"redis-full-noeviction[{sharded_counter_engine}]", read_while_full=full_read)


# -- 5. back in an older state: what a rollback does -----------------------------------------


def test_a_redis_back_in_an_older_state_counts_a_folded_stash_twice(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    redis_server: Callable[..., RedisServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cache that comes back as it was some time ago (an RDB snapshot older than the
    last writes; the same holds for a replica promoted before it had them) does not
    just lose keys: a stash folded into the shards since then is pending again and is
    written a second time, and so is a SharedBuffer amount flushed since; a cached
    total is short of the writes merged since, until ``repair`` (``verify`` shows it).

    Here the snapshot (``SAVE``) holds a stash of +15 and a buffer of +40; both are
    written to Datastore, 20 more increments merge into a cached total, then Redis is
    SIGKILLed and reloads the snapshot: the 15 and the 40 are counted twice, exactly,
    and the cached total reads 20 short until repaired."""
    server = redis_server("rdb")
    cache = cache_of(server)
    stashed = Counter("older-stashed", shards=4, rpc_timeout=2.0, **cache)
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = connected(Counter("older-stashed", shards=4, **cache, **UNREACHABLE))
    buffer = SharedBuffer(interval=600, rpc_timeout=2.0, **cache)
    busy = Counter("older-busy", shards=4, rpc_timeout=2.0, **cache)
    ledger = Ledger()
    for _ in range(3):
        ledger.increment(broken, 5)
    for _ in range(4):
        buffer.increment("older-buffered", 10)
    for _ in range(10):
        ledger.increment(busy, 1)
    assert (busy.count, stashed.get_count(nocache=True)) == (10, 15)
    snapshot = redis.Redis(server.host, server.port)
    try:
        assert snapshot.save()
    finally:
        snapshot.close()

    # After the snapshot: the stash and the buffer are written, 20 more increments.
    first = Ledger()
    fold_stash(stashed, first)
    buffer.flush("older-buffered")
    buffered = Counter("older-buffered", rpc_timeout=2.0, **cache)
    for _ in range(20):
        ledger.increment(busy, 1)
    assert_totals(stashed, 15 + first.acknowledged)
    assert (buffered.get_count(nocache=True), buffer.pending("older-buffered")) == (40, 0)
    assert_totals(busy, 30)

    server.kill()
    server.start()  # the snapshot's state: stash and buffer pending, busy's total at 10
    assert stashed._pending_stash() == 15
    assert buffer.pending("older-buffered") == 40
    assert (busy.count, busy.get_count(nocache=True)) == (10, 30)
    stale = busy.verify()
    assert (stale.ok, stale.drift) == (False, -20), stale

    # The next writes fold the stash again, the next flush writes the 40 again.
    second = Ledger()
    fold_stash(stashed, second)
    buffer.flush("older-buffered")
    acknowledged = 15 + first.acknowledged + second.acknowledged
    stash_twice = stashed.get_count(nocache=True) - acknowledged
    buffer_twice = buffered.get_count(nocache=True) - 40
    assert (stash_twice, buffer_twice) == (15, 40)
    assert_totals(stashed, acknowledged + stash_twice)
    # repair rebuilds the short cached total; the doubled amounts are in the shards.
    assert busy.repair().ok
    assert_totals(busy, 30)
    assert ledger.errors == [] and ledger.refused_calls == 0
    report(
        f"redis-older-state[{sharded_counter_engine}]",
        counted_twice_stash=stash_twice,
        counted_twice_buffered=buffer_twice,
        cached_total_short_by=-stale.drift,
    )
