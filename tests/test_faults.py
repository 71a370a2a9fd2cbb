"""Exactness of the counter while its real backends misbehave.

Every behaviour test runs once per Datastore engine (classic emulator, Firestore
emulator in Datastore mode) against real processes, with real memcached. The
faults are real too: memcached flushed, restarted, SIGKILLed or SIGSTOPped; the
emulator's JVM SIGSTOPped; a Datastore host where nothing listens.

Each fault test keeps a ledger of what callers were told: an increment whose
``increment()`` returned is acknowledged and must be in the total; one that
raised ``IncrementNotRecorded`` was refused and must not be. After the writers
stop and the faults are healed, the cached total (``count``) and the shard sum
(``get_count(nocache=True)``) must both equal the ledger.

Run with ``-s`` to see the measured numbers (lines starting ``[faults]``).
"""

from __future__ import annotations

import bisect
import logging
import multiprocessing
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from cachekit import cache_url_through, dead_cache_url
from faultkit import (
    Ledger,
    ReplyHoldingRelay,
    connected,
    increment_loop,
    merged_stats,
    probe_through_relay,
    report,
    swallow,
    writers_running,
)
from google.api_core import exceptions as gexc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sharded_counter import (
    CacheUnavailable,
    Counter,
    DatastoreUnavailable,
    IncrementOutcomeUnknown,
    Settings,
    config,
)
from sharded_counter.cache.client import OutageLog, build_client
from sharded_counter.core import outcomes
from sharded_counter.core.outcomes import Ending
from sharded_counter.core.stash import Fold, Stash
from sharded_counter.paths.sets import Setter
from sharded_counter.paths.shard_writes import ShardWriter, WriteFailed
from sharded_counter.store import entities as entities_module
from sharded_counter.store.shards import ShardOverflow, ShardStore
from sharded_counter_emulator import DatastoreEmulator, free_port

pytestmark = pytest.mark.backends

WRITERS = 16  # threads per writing test, as the brief asks

# A Datastore that is down: no retries worth waiting for, and quick to say so.
UNREACHABLE = {"retry_attempts": 1, "retry_deadline": 0.3, "rpc_timeout": 0.3}
# memcache calls bounded tightly, so an outage costs little per call.
FAST_MEMCACHE = {"memcache_timeout": 0.2, "memcache_connect_timeout": 0.2}


def pending_stash(counter: Counter) -> int:
    """White-box: the delayed_incr amount waiting in memcache for this counter."""
    return counter._pending_stash()


def fold_stash(counter: Counter, ledger: Ledger) -> None:
    """Fold whatever is stashed with real increments (each acknowledged and booked).

    The first write only notices the stash (its merge looks at it); a later one takes
    it. Unsure writes are resolved by writes too, but a process waits a second after
    a failed try before the next, so this keeps writing for a few seconds.
    """
    deadline = time.monotonic() + 10
    while pending_stash(counter) != 0 and time.monotonic() < deadline:
        ledger.increment(counter, 1)
        time.sleep(0.05)
    assert pending_stash(counter) == 0, "healthy writes did not fold the stash in 10 s"


def assert_totals(counter: Counter, expected: int) -> None:
    cached, uncached = counter.count, counter.get_count(nocache=True)
    assert (cached, uncached) == (expected, expected), (
        f"cached={cached} uncached={uncached} ledger={expected}: "
        f"cached off by {cached - expected}, uncached off by {uncached - expected}"
    )


def read_bound_violations(
    reads: Sequence[tuple[float, float, int]], events: Sequence[tuple[float, float, int]]
) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """Reads outside what a linearizable counter could return (all deltas positive).

    A read should include every increment acknowledged before the read began, and can
    include nothing that had not even started when the read ended. Returns the reads
    below and above those bounds, as (when the read began, by how much).
    """
    by_end = sorted((end, delta) for _, end, delta in events)
    by_start = sorted((start, delta) for start, _, delta in events)
    ends, starts = [e for e, _ in by_end], [s for s, _ in by_start]
    done_prefix, started_prefix = [0], [0]
    for _, delta in by_end:
        done_prefix.append(done_prefix[-1] + delta)
    for _, delta in by_start:
        started_prefix.append(started_prefix[-1] + delta)
    below: list[tuple[float, int]] = []
    above: list[tuple[float, int]] = []
    for begin, finish, value in reads:
        low = done_prefix[bisect.bisect_left(ends, begin)]
        high = started_prefix[bisect.bisect_right(starts, finish)]
        if value < low:
            below.append((begin, low - value))
        elif value > high:
            above.append((begin, value - high))
    return below, above


def warnings_containing(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if r.name == "sharded_counter" and text in r.getMessage())


# -- 1. cache coherence under churn ---------------------------------------------------------


def _churn_child(
    name: str, index: int, threads: int, start: Any, stop: Any, out: Any
) -> None:  # pragma: no cover - runs in a spawned process
    """One writer process of the churn test: its own Counters, clients and connections."""
    counters = [Counter(name, shards=20), Counter(name, shards=20, cache_ttl=1)]
    for counter in counters:
        counter.get_count()  # connect to both backends before the clock starts
    out.put(("ready", index, None))
    start.wait(60)
    ledger = Ledger()
    body = increment_loop(
        ledger,
        lambda i, k: counters[i % 2],
        lambda i, k: 100 + 10 * index + i,  # distinct from the parent's deltas
    )
    workers = [threading.Thread(target=swallow, args=(body, i, stop)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put(
        (
            "done",
            index,
            {
                "events": ledger.events,
                "refused_calls": ledger.refused_calls,
                "errors": [repr(e) for e in ledger.errors],
                "stats": merged_stats(*counters),
            },
        )
    )


@pytest.mark.one_cache_server
def test_cache_stays_coherent_under_flushes_restarts_and_ttl_expiry(
    sharded_counter_env: dict[str, str],
    sharded_counter_cache: Any,
    own_memcache: Callable[..., Any],
    sharded_counter_engine: str,
) -> None:
    """16 threads and 2 processes write while memcached is flushed, restarted and expiring."""
    name = "churn"
    client = own_memcache()
    plain = Counter(name, shards=20, memcache_client=client)
    short_lived = Counter(name, shards=20, cache_ttl=1, memcache_client=client)
    assert plain.count == 0  # warms both backends and caches a complete record

    ctx = multiprocessing.get_context("spawn")
    start, stop_children, out = ctx.Event(), ctx.Event(), ctx.Queue()
    children = [
        ctx.Process(target=_churn_child, args=(name, n, 2, start, stop_children, out), daemon=True)
        for n in range(2)
    ]
    ledger = Ledger()
    reads: list[tuple[float, float, int]] = []
    chaos_log = {"flushes": 0, "restarts": 0}
    restarted_at: list[float] = []
    chaos_errors: list[BaseException] = []
    child_stats: list[dict[str, int]] = []

    def reader(i: int, stop: threading.Event) -> None:
        counter = (plain, short_lived)[i % 2]
        while not stop.is_set():
            began = time.monotonic()
            value = counter.count
            reads.append((began, time.monotonic(), value))
            time.sleep(0.005)

    def chaos(_: int, stop: threading.Event) -> None:
        rng, began = random.Random(1), time.monotonic()
        try:
            while not stop.wait(rng.uniform(0.1, 0.3)):
                if not chaos_log["restarts"] and time.monotonic() - began > 1.5:
                    sharded_counter_cache.restart()  # same port, every item gone
                    chaos_log["restarts"] += 1
                    restarted_at.append(time.monotonic())
                else:
                    sharded_counter_cache.flush_all()
                    chaos_log["flushes"] += 1
        except BaseException as exc:  # reported by the assertion below
            chaos_errors.append(exc)

    for child in children:
        child.start()
    try:
        for _ in children:
            kind, _, _ = out.get(timeout=90)
            assert kind == "ready"
        began = time.monotonic()
        # Half the writers cache with a 1 s TTL, so records also expire under the readers.
        writes = increment_loop(
            ledger, lambda i, k: (plain, short_lived)[i % 2], lambda i, k: i + 1
        )
        with (
            writers_running(WRITERS, writes),
            writers_running(2, reader),
            writers_running(1, chaos),
        ):
            start.set()
            time.sleep(4.0)
            stop_children.set()
        seconds = time.monotonic() - began
        for _ in children:
            kind, index, payload = out.get(timeout=60)
            assert kind == "done"
            assert payload["errors"] == [], f"child {index} failed: {payload['errors']}"
            assert payload["refused_calls"] == 0
            ledger.add_events(payload["events"])
            child_stats.append(payload["stats"])
        for child in children:
            child.join(30)
            assert child.exitcode == 0
    finally:
        stop_children.set()
        for child in children:
            child.join(10)
            if child.is_alive():
                child.terminate()  # our own child: never leave it behind

    assert ledger.errors == [] and chaos_errors == []
    assert ledger.refused_calls == 0
    assert chaos_log["restarts"] == 1 and chaos_log["flushes"] >= 5
    stashed = merged_stats(plain, short_lived)["stashed"] + sum(s["stashed"] for s in child_stats)
    # A stash lives in memcache, which this test wipes on purpose: with one, the
    # comparison below would test memcache durability, not cache coherence.
    assert stashed == 0, "contention pushed writes into delayed_incr; raise the shard count"
    assert len({e[2] for e in ledger.events}) >= WRITERS + 4  # every writer got through
    assert_totals(plain, ledger.acknowledged)
    assert_totals(short_lived, ledger.acknowledged)
    stale, inflated = read_bound_violations(reads, ledger.events)
    after_restart = [round(t - restarted_at[0], 3) for t, _ in stale]
    report(
        f"churn[{sharded_counter_engine}]",
        increments=ledger.acked_calls,
        per_second=ledger.acked_calls / seconds,
        reads=len(reads),
        flushes=chaos_log["flushes"],
        restarts=chaos_log["restarts"],
        total=ledger.acknowledged,
        stale_reads=len(stale),
        stale_by=max((d for _, d in stale), default=0),
        stale_s_after_restart=after_restart[:8],
    )
    # No read may count more than had even started: that would be a double count.
    assert inflated == [], inflated[:5]
    # Reads lower than what was acknowledged before them do happen right after the
    # restart: a writer's merge fails on a stale pooled socket while a reader fills
    # the record (test_a_memcached_restart_while_idle_leaves_no_stale_total pins it).
    # Anything else stale would be a flaw of the cache protocol itself.
    assert all(0 <= t < 1.0 for t in after_restart), after_restart


# -- 2. memcached down or stalled -------------------------------------------------------


@pytest.mark.one_cache_server
@pytest.mark.parametrize("outage", ["killed", "stalled"])
def test_memcached_outage_costs_no_increment_and_no_exactness(
    sharded_counter_env: dict[str, str],
    sharded_counter_cache: Any,
    sharded_counter_backends: Any,
    sharded_counter_engine: str,
    caplog: pytest.LogCaptureFixture,
    own_memcache: Callable[..., Any],
    outage: str,
) -> None:
    """memcached SIGKILLed or SIGSTOPped under 16 writers: writes commit, reads stay exact."""
    caplog.set_level(logging.WARNING, logger="sharded_counter")
    client = own_memcache(**FAST_MEMCACHE)
    counter = Counter(
        f"mc-{outage}", shards=10, rpc_timeout=2.0, memcache_client=client, **FAST_MEMCACHE
    )
    ledger = Ledger()
    ledger.increment(counter, 5)
    assert counter.count == 5  # a complete record is cached before the outage

    reads: list[tuple[float, float, int]] = []

    def writer(i: int, stop: threading.Event) -> None:
        k = 0
        while not stop.is_set():
            ledger.increment(counter, i + 1)
            k += 1
            if k % 3 == 0:  # readers race the writers through the outage
                began = time.monotonic()
                value = counter.count
                ended = time.monotonic()
                reads.append((began, ended, value))
                ledger.latencies.append((began, ended - began))

    try:
        with writers_running(WRITERS, writer):
            time.sleep(0.4)
            outage_began = time.monotonic()
            # The outage starts while calls are in flight, as a real crash would.
            if outage == "killed":
                sharded_counter_cache.kill()
            else:
                sharded_counter_cache.pause()
            time.sleep(1.6)
        outage_writes = sum(1 for s, _, _ in ledger.events if s > outage_began)
        began = time.monotonic()
        down_cached = counter.count
        down_read = time.monotonic() - began
        down_uncached = counter.get_count(nocache=True)
        max_call = ledger.max_latency(since=outage_began)
    finally:
        if outage == "killed":
            sharded_counter_cache.start()
        else:
            sharded_counter_cache.resume()

    assert ledger.errors == [] and ledger.refused_calls == 0
    assert outage_writes > 0, "no increment was acknowledged while memcached was out"
    # With memcache out every read sums the shards: exact, nothing stale.
    assert (down_cached, down_uncached) == (ledger.acknowledged, ledger.acknowledged)
    # 0.2 s per memcache call, at most two per call on the failure path, plus Datastore
    # time on a loaded 2-core machine: far below what an unbounded wait would show.
    assert max_call < 3.0, f"a call took {max_call:.2f}s during the outage"
    stale, inflated = read_bound_violations(reads, ledger.events)
    assert (stale, inflated) == ([], [])

    # Back up: more concurrent writes, then the cached total must rebuild exactly.
    with writers_running(WRITERS, increment_loop(ledger, lambda i, k: counter, lambda i, k: 1)):
        time.sleep(0.5)
    assert ledger.errors == []
    assert_totals(counter, ledger.acknowledged)
    assert warnings_containing(caplog, "memcache is unavailable") == 1
    assert warnings_containing(caplog, "memcache answers again") == 1

    # Proof the total is served from the rebuilt cache: Datastore is frozen meanwhile.
    emulator = sharded_counter_backends.emulator(sharded_counter_engine)
    emulator.pause()
    try:
        began = time.monotonic()
        frozen_read = counter.count
        frozen_seconds = time.monotonic() - began
    finally:
        emulator.resume()
    assert frozen_read == ledger.acknowledged
    assert frozen_seconds < 1.0
    report(
        f"memcached-{outage}[{sharded_counter_engine}]",
        increments=ledger.acked_calls,
        during_outage=outage_writes,
        max_call_s=max_call,
        read_while_down_s=down_read,
        unavailable_warnings=warnings_containing(caplog, "memcache is unavailable"),
    )


@pytest.mark.one_cache_server
def test_a_memcached_restart_while_idle_costs_no_increment(
    sharded_counter_env: dict[str, str],
    sharded_counter_cache: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    own_memcache: Callable[..., Any],
) -> None:
    """memcached restarted between calls, fully up again before the next one."""
    caplog.set_level(logging.WARNING, logger="sharded_counter")
    client = own_memcache(**FAST_MEMCACHE)
    healthy = Counter("idle-restart", shards=4, memcache_client=client)
    healthy.increment(1)
    assert healthy.count == 1  # the pool now holds an idle connection
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = connected(Counter("idle-restart", shards=4, memcache_client=client, **UNREACHABLE))
    sharded_counter_cache.restart()  # returns once the new server answers
    sharded_counter_cache.flush_all()  # and it does

    ledger = Ledger()
    for _ in range(3):
        ledger.increment(broken, 5)  # Datastore down, memcached up: each should be stashed
    report(
        "idle-restart",
        refused=ledger.refused_calls,
        unavailable_warnings=warnings_containing(caplog, "memcache is unavailable"),
    )
    assert ledger.errors == []
    assert_totals(healthy, 1 + ledger.acknowledged)
    assert ledger.refused_calls == 0, f"{ledger.refused_calls} of 3 refused with memcached up"
    assert warnings_containing(caplog, "memcache is unavailable") == 0


@pytest.mark.memcached_only  # pymemcache's pool of sockets (Redis: test_cache_conformance)
def test_a_memcached_restart_with_several_idle_sockets_costs_no_call(
    sharded_counter_cache: Any, own_memcache: Callable[..., Any]
) -> None:
    """Three idle pooled sockets, all stale after a restart: the next call drops them one
    by one and answers on a fresh socket. (Found when a rate limit test met a shared
    client whose pool an earlier test had grown to two sockets: the second stale one
    failed the call, and the limiter failed open.)"""
    client = own_memcache(**FAST_MEMCACHE)
    pool = client._client.client_pool  # the RetryingClient's PooledClient
    sockets = [pool.get() for _ in range(3)]
    for each in sockets:
        each.version()  # connected
    for each in sockets:
        pool.release(each)
    sharded_counter_cache.restart()
    client.set("after-restart", b"1")
    assert client.get("after-restart") == b"1"


@pytest.mark.one_cache_server
def test_a_memcached_restart_while_idle_leaves_no_stale_total(
    sharded_counter_env: dict[str, str],
    sharded_counter_cache: Any,
    own_memcache: Callable[..., Any],
) -> None:
    """Two processes' worth of cache tiers: a reader and a writer, each with its own client."""
    reader = Counter("stale-total", shards=4, memcache_client=own_memcache())
    writer = Counter("stale-total", shards=4, memcache_client=own_memcache())
    writer.increment(1)  # the writer's pool now holds an idle connection
    sharded_counter_cache.restart()
    assert reader.count == 1  # the reader (fresh sockets) caches a complete record
    writer.increment(5)  # acknowledged; its merge meets the stale socket
    stale = reader.count
    time.sleep(1.0)
    still = reader.count
    writer.get_count()  # any cache call of the writer's tier drops the suspect record
    healed = reader.count
    report("stale-total", acknowledged=6, read=stale, one_second_later=still, healed=healed)
    if healed != 6:
        pytest.fail(f"setup: the writer's next cache call did not heal the record ({healed})")
    assert (stale, still) == (6, 6)


# -- 3. Datastore stalled or unreachable --------------------------------------------------


class CommitSpy:
    """Instrumentation of the real write path: which attempts' commits had an unknown outcome.

    A commit that fails with anything but Aborted (a timeout, say) may still have been
    applied by the server. Each such attempt's amount is kept, so a total above the
    ledger can be explained (or not) by commits that landed after the client gave up.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ambiguous: list[int] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        commit = ShardStore.commit

        # The store's calls are steps (core/effects.py): so are these wrappers.
        def spied_commit(store: ShardStore, *args: Any, **kwargs: Any) -> Any:
            try:
                return (yield from commit(store, *args, **kwargs))
            except gexc.Aborted:
                raise  # refused by the server: certainly not applied
            except Exception:
                self._local.unknown = True
                raise

        monkeypatch.setattr(ShardStore, "commit", spied_commit)
        for method in ("add_in_transaction", "add_with_transform"):
            monkeypatch.setattr(ShardStore, method, self._attempt(getattr(ShardStore, method)))

    def _attempt(self, write: Callable[..., Any]) -> Callable[..., Any]:
        def attempt(store: ShardStore, name: str, index: int, delta: int, **kw: Any) -> Any:
            self._local.unknown = False
            try:
                return (yield from write(store, name, index, delta, **kw))
            except ShardOverflow:
                raise
            except Exception:
                if self._local.unknown:
                    with self._lock:
                        self.ambiguous.append(delta)
                raise

        return attempt


def test_a_stalled_datastore_keeps_writes_unsure_then_counts_exactly(
    sharded_counter_env: dict[str, str],
    sharded_counter_backends: Any,
    sharded_counter_engine: str,
    monkeypatch: pytest.MonkeyPatch,
    own_memcache: Callable[..., Any],
) -> None:
    """The emulator's JVM SIGSTOPped for 2.5 s under 16 writers, then let go.

    Writes that time out have an unknown outcome: they are kept as unsure entries
    and resolved by token-checked transactions once the emulator answers again.
    Writes refused outright are stashed. Either way the total ends exact.
    """
    name = "stall"
    counter = Counter(
        name, shards=10, retry_deadline=1.0, rpc_timeout=0.5, memcache_client=own_memcache()
    )
    ledger = Ledger()
    ledger.increment(counter, 1)  # the first call probes and connects: before any fault
    assert counter.count == 1
    spy = CommitSpy(monkeypatch)
    emulator = sharded_counter_backends.emulator(sharded_counter_engine)

    # Distinct deltas per thread and per call, so a landing can be told from another.
    writes = increment_loop(ledger, lambda i, k: counter, lambda i, k: 1000 * (i + 1) + k % 1000)
    with writers_running(WRITERS, writes):
        time.sleep(0.8)
        paused_at = time.monotonic()
        emulator.pause()
        try:
            time.sleep(2.5)
        finally:
            emulator.resume()
        resumed_at = time.monotonic()
        time.sleep(2.0)  # healthy writes fold what was stashed meanwhile
    fold_stash(counter, ledger)

    stats = merged_stats(counter)
    assert ledger.errors == [] and ledger.refused_calls == 0
    kept = stats["stashed"] + stats["unsure"]
    assert kept > 0, "no write was stashed or kept unsure while Datastore was frozen"
    assert stats["folded"] + stats["resolved"] > 0, f"nothing kept was written later: {stats}"
    cached, uncached = counter.count, counter.get_count(nocache=True)
    assert cached == uncached
    excess = uncached - ledger.acknowledged
    report(
        f"datastore-stall[{sharded_counter_engine}]",
        increments=ledger.acked_calls,
        stashed=stats["stashed"],
        folded=stats["folded"],
        unsure=stats["unsure"],
        resolved=stats["resolved"],
        transient_errors=stats["transient_errors"],
        unknown_outcome_commits=len(spy.ambiguous),
        excess=excess,
        max_call_s=ledger.max_latency(since=paused_at, until=resumed_at),
    )
    if sharded_counter_engine == "classic":
        # On Firestore the pause may catch only transforms' BeginTransaction calls,
        # which wrote nothing (stashed, counted in ``kept`` above), and no commit.
        assert stats["unsure"] > 0, "setup: no write timed out with an unknown outcome"
    assert excess == 0, (
        f"acknowledged {ledger.acknowledged}, counted {uncached}; unknown-outcome "
        f"commits {spy.ambiguous[:20]}"
    )


def test_an_on_disk_emulator_restarted_under_writers_loses_no_count(
    sharded_counter_cache: Any,
    monkeypatch: pytest.MonkeyPatch,
    own_memcache: Callable[..., Any],
) -> None:
    """A classic emulator that stores on disk goes down and comes back on the same
    port, with its data, while 16 threads write (the Firestore emulator keeps data in
    memory only).

    While it is down, writes are refused ("failed to connect": stashed) or break
    mid-call (kept unsure); once it is back, later writes fold and resolve them from
    the shards it reloaded.

    The writers reach it through a relay, which takes it off the network first (every
    connection breaks, new ones are refused), then the emulator restarts with no
    client attached, then the relay lets clients back. Restarting the emulator itself
    under load is not a restart a client can survive: its JVM keeps answering after
    SIGTERM while its shutdown hooks run side by side, and now and then it hangs
    there and must be killed (1 in 9 tries under load, 60 s and more), losing every
    write since it started, acknowledged ones too (6 to 72 acknowledged writes lost in
    such tries of a script doing blind puts). A SIGKILL loses them as well
    (test_emulator.py shows it).
    """
    emulator = DatastoreEmulator("classic", on_disk=True).start()
    relay = ReplyHoldingRelay(emulator.host, emulator.port)
    try:
        for key, value in emulator.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
        counter = Counter(
            "restarted",
            shards=10,
            retry_deadline=1.0,
            rpc_timeout=0.5,
            memcache_client=own_memcache(),
        )
        ledger = Ledger()
        ledger.increment(counter, 1)  # probes and connects before the fault
        writes = increment_loop(ledger, lambda i, k: counter, lambda i, k: i + 1)
        with writers_running(WRITERS, writes):
            time.sleep(1.0)
            began = time.monotonic()
            relay.cut()
            time.sleep(0.2)  # what was relayed already finishes at the emulator
            emulator.restart()  # no client attached: a clean stop, its file written
            relay.restore()
            down_s = time.monotonic() - began
            time.sleep(2.0)  # healthy writes fold and resolve what was kept meanwhile
        fold_stash(counter, ledger)
        stats = merged_stats(counter)
        report(
            "datastore-restart[classic-on-disk]",
            increments=ledger.acked_calls,
            down_s=down_s,
            stashed=stats["stashed"],
            folded=stats["folded"],
            unsure=stats["unsure"],
            resolved=stats["resolved"],
            refused=ledger.refused_calls,
        )
        assert ledger.errors == []
        assert stats["stashed"] + stats["unsure"] > 0, "setup: no write met the restart"
        assert_totals(counter, ledger.acknowledged)
    finally:
        relay.close()
        emulator.stop()


@pytest.mark.one_cache_server
def test_datastore_unreachable_and_memcached_down_refuses_the_increment(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    sharded_counter_cache: Any,
    monkeypatch: pytest.MonkeyPatch,
    own_memcache: Callable[..., Any],
) -> None:
    """Nowhere to put the delta: IncrementNotRecorded, and the ledger leaves it out."""
    name = "both-down"
    client = own_memcache(**FAST_MEMCACHE)
    healthy = Counter(name, shards=10, memcache_client=client)
    ledger = Ledger()
    ledger.increment(healthy, 3)
    assert healthy.count == 3
    with monkeypatch.context() as patch:
        # Nothing listens there: connection refused, so no request can land late.
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = connected(Counter(name, shards=10, memcache_client=client, **UNREACHABLE))

    # Half the threads lose both backends; half keep Datastore and lose only the cache.
    writes = increment_loop(
        ledger, lambda i, k: broken if i % 2 else healthy, lambda i, k: 10 * (i + 1), pause=0.01
    )
    sharded_counter_cache.kill()
    try:
        with writers_running(WRITERS, writes):
            time.sleep(1.5)
        down_totals = (healthy.count, healthy.get_count(nocache=True))
    finally:
        sharded_counter_cache.start()

    assert ledger.errors == []
    assert ledger.refused_calls > 0
    assert merged_stats(broken)["stashed"] == 0
    # memcache being down, no stash could be taken: each refusal is its caller's delta only.
    assert ledger.refused_stash == 0
    assert down_totals == (ledger.acknowledged, ledger.acknowledged)
    assert_totals(healthy, ledger.acknowledged)
    report(
        f"both-down[{sharded_counter_engine}]",
        acknowledged=ledger.acked_calls,
        refused=ledger.refused_calls,
        refused_sum=ledger.refused,
    )


def pause_before_the_next_commit(monkeypatch: pytest.MonkeyPatch, emulator: Any) -> None:
    """SIGSTOP ``emulator`` just before the next commit is sent (the calls before it
    answered), so that the commit is what times out."""
    commit, paused = ShardStore.commit, threading.Event()

    def pausing(store: ShardStore, *args: Any, **kwargs: Any) -> Any:
        if not paused.is_set():
            paused.set()
            emulator.pause()
        return (yield from commit(store, *args, **kwargs))

    monkeypatch.setattr(ShardStore, "commit", pausing)


def lose_the_next_commit_reply(
    monkeypatch: pytest.MonkeyPatch,
    relay: ReplyHoldingRelay,
    meanwhile: Callable[[], None] = lambda: None,
) -> threading.Event:
    """The next commit reaches the emulator, but the relay holds its reply past the
    client's timeout; ``meanwhile`` runs before the reply is let go. Returns an
    event set once that commit was sent."""
    commit, held = ShardStore.commit, threading.Event()

    def commit_with_lost_reply(store: ShardStore, *args: Any, **kwargs: Any) -> Any:
        if held.is_set():
            return (yield from commit(store, *args, **kwargs))
        held.set()
        relay.hold.set()
        try:
            return (yield from commit(store, *args, **kwargs))
        finally:
            try:
                meanwhile()
            finally:
                relay.hold.clear()

    monkeypatch.setattr(ShardStore, "commit", commit_with_lost_reply)
    return held


def test_a_commit_that_timed_out_but_landed_is_counted_once(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    relay: ReplyHoldingRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The emulator applies a commit whose reply is held past rpc_timeout.

    The relay is a fault injector, not a fake: a real emulator receives and applies
    the commit; the test only chooses the moment to delay replies (the first commit
    of one increment), which a SIGSTOP cannot target.
    """
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
    probe_through_relay()  # with the default time limits
    counter = Counter("unknown-outcome", shards=4, rpc_timeout=0.5, retry_deadline=5.0)
    counter.increment(1)  # connect through the relay first
    assert counter.write_mode in ("transaction", "transform")
    spy = CommitSpy(monkeypatch)
    lose_the_next_commit_reply(monkeypatch, relay)
    counter.increment(7)  # acknowledged once
    if spy.ambiguous != [7]:
        pytest.fail(f"setup: expected one timed-out commit of 7, saw {spy.ambiguous}")
    time.sleep(0.3)
    uncached = counter.get_count(nocache=True)
    report(f"unknown-outcome[{sharded_counter_engine}]", ledger=8, total=uncached)
    assert uncached == 1 + 7, f"acknowledged 8, counted {uncached}"


@pytest.mark.parametrize("fate", ["landed", "dropped"])
def test_a_write_whose_retries_ran_out_unsure_is_counted_once(
    sharded_counter_env: dict[str, str],
    sharded_counter_backends: Any,
    sharded_counter_engine: str,
    relay: ReplyHoldingRelay,
    monkeypatch: pytest.MonkeyPatch,
    fate: str,
) -> None:
    """The only attempt of +7 times out, so the write gives up not knowing its outcome.

    "landed": the relay holds the commit's reply, and the real emulator applies it.
    "dropped": the emulator's JVM is SIGSTOPped as the commit goes out (a transform's
    transaction, or a transaction's read, has begun: a call before the commit that
    times out writes nothing), and on SIGCONT it drops the expired request. Either
    way the increment returns, kept as an unsure entry that readers count, and a
    reader ("landed") or ``repair`` ("dropped") resolves it with a transaction that
    looks for the write's token: found, or added once.
    """
    emulator = sharded_counter_backends.emulator(sharded_counter_engine)
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
    probe_through_relay()  # with the default time limits
    name = f"unsure-{fate}"
    # One attempt, so the fault below ends it; 2 s, so that the setup write before it
    # does not time out on a loaded machine (0.5 s did, in CI).
    counter = Counter(name, shards=4, rpc_timeout=2.0, retry_attempts=1)
    counter.increment(1)  # connect through the relay first
    assert counter.count == 1
    if fate == "landed":
        held = lose_the_next_commit_reply(monkeypatch, relay)
        counter.increment(7)
        assert held.is_set(), "setup: no commit was held"
    else:
        pause_before_the_next_commit(monkeypatch, emulator)
        try:
            counter.increment(7)
        finally:
            emulator.resume()
    stats = counter.stats.snapshot()
    assert (stats["unsure"], stats["stashed"]) == (1, 0), stats
    reader = Counter(name, shards=4)
    if fate == "landed":
        total = reader.count  # resolves the entry first
    else:
        repaired = reader.repair()
        assert repaired.ok and repaired.pending == 0, repaired
        total = repaired.shards
    entries = Stash.decode(reader._backend.cache._client.get(reader._stash_key)).unsure
    report(f"unsure-{fate}[{sharded_counter_engine}]", ledger=8, total=total, left=len(entries))
    assert reader.stats.snapshot()["resolved"] == 1
    assert not entries, f"unsure entries left after the read: {dict(entries)}"
    assert_totals(reader, 8)
    counter.increment(2)  # the writer's shard is free again; nothing is counted twice
    assert_totals(reader, 10)


def test_a_resolution_whose_reply_was_lost_keeps_its_token_where_it_is_looked_for(
    sharded_counter_env: dict[str, str],
    sharded_counter_backends: Any,
    sharded_counter_engine: str,
    relay: ReplyHoldingRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """S5' on the real backends (found by the simulator, docs/protocol.md section 6).

    Another process leaves +7 unsure, not landed (the emulator paused as its commit
    went out, past its deadline), and exits. This process resolves it: the resolution
    writes the 7 with its token in this process's slot, but its reply is lost (the
    relay holds it), so the entry stays. Then this process writes +2 to the same shard
    (there is one).
    Had it let the token go, on Firestore that write would be a transform, replacing
    its slot, and the next resolution, finding no token, would add the 7 again. The
    token stays pinned and the shard reserved until the entry is gone: 10, not 17."""
    emulator = sharded_counter_backends.emulator(sharded_counter_engine)
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
    probe_through_relay()  # with the default time limits
    name = "resolution-lost"
    spawn = multiprocessing.get_context("spawn")
    connected_there, go = spawn.Event(), spawn.Event()
    committing, paused = spawn.Event(), spawn.Event()
    writer = spawn.Process(
        target=_leave_unsure, args=(name, connected_there, go, committing, paused)
    )
    writer.start()
    assert connected_there.wait(60), "setup: the other process did not connect"
    go.set()
    try:
        assert committing.wait(60), "setup: the other process sent no commit"
        emulator.pause()  # as its +7's commit goes out
        paused.set()
        writer.join(60)  # its +7 times out, kept unsure; then it exits
    finally:
        emulator.resume()
    assert writer.exitcode == 0, "setup: the other process failed"
    counter = Counter(name, shards=1, max_shards=1, rpc_timeout=2.0, retry_attempts=1)
    assert len(Stash.decode(counter._backend.cache._client.get(counter._stash_key)).unsure) == 1
    held = lose_the_next_commit_reply(monkeypatch, relay)
    counter.write_pending()  # resolves: its commit lands, its reply is lost
    assert held.is_set(), "setup: the resolution made no commit"
    unsure = Stash.decode(counter._backend.cache._client.get(counter._stash_key)).unsure
    assert len(unsure) == 1  # the entry stays, to be resolved again
    counter.increment(2)  # the same shard: it must keep the resolution's token there
    time.sleep(1.2)  # past the pause after a failed resolution (paths/unsure.py)
    counter.write_pending()  # resolves again: finds the token, adds nothing
    unsure = Stash.decode(counter._backend.cache._client.get(counter._stash_key)).unsure
    total = counter.get_count(nocache=True)
    report(f"resolution-lost[{sharded_counter_engine}]", ledger=10, total=total, left=len(unsure))
    assert not unsure
    assert_totals(counter, 10)


def _leave_unsure(
    name: str, connected_there: Any, go: Any, committing: Any, paused: Any
) -> None:  # pragma: no cover - runs in a spawned process
    """Another process: +1, then +7, whose commit waits for the test to pause the
    emulator before it goes out, times out, and is kept as an unsure entry; then it
    exits."""
    counter = Counter(name, shards=1, max_shards=1, rpc_timeout=2.0, retry_attempts=1)
    counter.increment(1)
    connected_there.set()
    go.wait(60)
    commit = ShardStore.commit

    def held(store: ShardStore, *args: Any, **kwargs: Any) -> Any:
        if not committing.is_set():
            committing.set()
            paused.wait(60)
        return (yield from commit(store, *args, **kwargs))

    ShardStore.commit = held  # type: ignore[method-assign]
    counter.increment(7)
    assert counter.stats.snapshot()["unsure"] == 1


@pytest.mark.one_cache_server
@pytest.mark.parametrize("fate", ["landed", "dropped"])
def test_a_fold_whose_outcome_is_unknown_while_memcached_is_down_is_counted_once(
    sharded_counter_env: dict[str, str],
    sharded_counter_cache: Any,
    sharded_counter_backends: Any,
    sharded_counter_engine: str,
    relay: ReplyHoldingRelay,
    monkeypatch: pytest.MonkeyPatch,
    own_memcache: Callable[..., Any],
    fate: str,
) -> None:
    """A write folds a stash of 1,000 into its +7; memcached is SIGSTOPped once it took
    the stash, and the write's only attempt ends with its outcome unknown: the relay
    holds the reply of a commit the emulator applies ("landed"), or the emulator's JVM
    is SIGSTOPped and drops it ("dropped").

    The write cannot keep itself as unsure, so the caller gets
    ``IncrementOutcomeUnknown`` for its 7. The 1,000 was acknowledged to someone
    else: its fold marker stays, and past the deadline its resolution looks for the
    write's token on every shard. Counted once either way.
    """
    monkeypatch.setattr(outcomes, "FOLD_MARGIN", 0.0)
    emulator = sharded_counter_backends.emulator(sharded_counter_engine)
    name = f"unknown-fold-{fate}"
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = connected(Counter(name, shards=4, memcache_client=own_memcache(), **UNREACHABLE))
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
    probe_through_relay()  # with the default time limits
    # One attempt, so the fault below ends it; 2 s, so that the setup writes before it
    # do not time out on a loaded machine (0.5 s did, in CI).
    options = {"rpc_timeout": 2.0, "retry_attempts": 1, "retry_deadline": 1.0}
    counter = Counter(name, shards=4, memcache_client=own_memcache(**FAST_MEMCACHE), **options)
    counter.increment(1)  # connect through the relay first
    broken.increment(1000)  # acknowledged: stashed in delayed_incr
    assert counter.count == 1001  # and now this writer knows there is a stash
    if fate == "landed":
        held = lose_the_next_commit_reply(monkeypatch, relay)
    write = ShardStore.add_in_transaction

    def memcached_then_datastore_fail(store: ShardStore, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("folded"):  # the take is done
            sharded_counter_cache.pause()
            if fate == "dropped":
                emulator.pause()
        return (yield from write(store, *args, **kwargs))

    try:
        with monkeypatch.context() as patch:
            patch.setattr(ShardStore, "add_in_transaction", memcached_then_datastore_fail)
            with pytest.raises(IncrementOutcomeUnknown) as unknown:
                counter.increment(7)
    finally:
        sharded_counter_cache.resume()
        if fate == "dropped":
            emulator.resume()
    assert unknown.value.delta == 7
    if fate == "landed":
        assert held.is_set(), "setup: no commit was held"
    # At once, before the fold's deadline: a cache call settles what the failed
    # one left, and the 1,000 must not go back as pending (it may have landed).
    counter.get_count()
    assert pending_stash(counter) == 0
    time.sleep(1.6)  # past the fold's deadline
    ledger = Ledger()
    fold_stash(counter, ledger)  # resolves the fold part: its token found, or not
    expected = 1 + 1000 + (7 if fate == "landed" else 0) + ledger.acknowledged
    left = Stash.decode(counter._backend.cache._client.get(counter._stash_key))
    report(f"unknown-fold-{fate}[{sharded_counter_engine}]", expected=expected, left=left.owed)
    assert not left.unsure and not left.folds, left
    assert_totals(counter, expected)


def _increment_elsewhere(
    emulator_host: str, name: str, times: int, slot: str
) -> None:  # pragma: no cover - runs in a spawned process
    """Another process writing the same one-shard counter, straight to the emulator."""
    os.environ["DATASTORE_EMULATOR_HOST"] = emulator_host
    entities_module.process_slot = slot  # drawn at random; pinned so the test cannot flake
    counter = Counter(name, shards=1, memcached_hosts=())
    for _ in range(times):
        counter.increment(1)


@pytest.mark.parametrize("writer", ["another-process", "this-process"])
def test_a_lost_reply_is_counted_once_when_others_wrote_the_shard_meanwhile(
    sharded_counter_env: dict[str, str],
    sharded_counter_backends: Any,
    sharded_counter_engine: str,
    relay: ReplyHoldingRelay,
    monkeypatch: pytest.MonkeyPatch,
    writer: str,
) -> None:
    """The first commit of +7 is applied but its reply held; before this process retries,
    a second process, or another thread of this one, writes the same shard twenty times.

    Each write names only its own process's token slot, so the other process's writes
    leave this one's token for the retry to find, on the transform path and on the
    transaction path alike (earlier, transactions kept the last 16 tokens of any process
    in one list, and twenty writes pushed this one out). This process's own writes
    append to its slot, which keeps the last eight tokens and every pinned one: the
    token of a write in flight is pinned. On Firestore the +7 is a transform, and this
    process's own writes wait until it is fenced (W12): they land after the retry.
    """
    emulator = sharded_counter_backends.emulator(sharded_counter_engine)
    direct = f"{emulator.host}:{emulator.port}"
    monkeypatch.setattr(entities_module, "process_slot", "a1a1")
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
    probe_through_relay()  # with the default time limits
    name = "unknown-outcome-shared"
    counter = Counter(name, shards=1, rpc_timeout=0.5, retry_deadline=10.0)
    counter.increment(1)  # connect through the relay first
    ctx = multiprocessing.get_context("spawn")
    waiting: list[threading.Thread] = []

    def write_elsewhere() -> None:
        # The +7 has landed and this process gave up on its reply: now the
        # other writer writes the shard, before the retry looks at it.
        if writer == "this-process":
            with monkeypatch.context() as patch:
                patch.setenv("DATASTORE_EMULATOR_HOST", direct)
                mine = connected(Counter(name, shards=1, memcached_hosts=()))
            thread = threading.Thread(target=lambda: [mine.increment(1) for _ in range(20)])
            thread.start()
            if sharded_counter_engine == "firestore":
                # The +7 is a transform: writes of its process to that shard wait until
                # it is answered or fenced (W12), so these land after it, not before.
                time.sleep(1.0)
                assert thread.is_alive(), "a write landed where our transform may land"
                waiting.append(thread)
                return
            thread.join(60)
            assert not thread.is_alive(), "setup: the other thread hung"
            return
        other = ctx.Process(target=_increment_elsewhere, args=(direct, name, 20, "b2b2"))
        other.start()
        other.join(60)
        assert other.exitcode == 0, "setup: the other process failed"

    held = lose_the_next_commit_reply(monkeypatch, relay, meanwhile=write_elsewhere)
    counter.increment(7)  # acknowledged once
    assert held.is_set(), "setup: no commit was held"
    for thread in waiting:
        thread.join(60)
        assert not thread.is_alive(), "setup: the other thread hung"
    uncached = counter.get_count(nocache=True)
    report(f"unknown-outcome-{writer}[{sharded_counter_engine}]", ledger=28, total=uncached)
    assert uncached == 1 + 7 + 20, f"acknowledged 28, counted {uncached}"


# -- 4. delayed_incr atomicity -----------------------------------------------------------


def test_concurrent_stashing_and_folding_neither_loses_nor_doubles(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    monkeypatch: pytest.MonkeyPatch,
    own_memcache: Callable[..., Any],
) -> None:
    """8 threads stash (their Datastore is unreachable) while 8 take and fold the stash."""
    name = "stash-race"
    client = own_memcache()
    healthy = Counter(name, shards=10, memcache_client=client)
    ledger = Ledger()
    ledger.increment(healthy, 1)
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = connected(Counter(name, shards=10, memcache_client=client, **UNREACHABLE))

    writes = increment_loop(
        ledger,
        lambda i, k: broken if i % 2 else healthy,
        # Distinct per thread; negatives too, so a lost or doubled one cannot hide.
        lambda i, k: (i + 1) * 7919 * (-1 if k % 5 == 4 else 1),
    )
    with writers_running(WRITERS, writes):
        time.sleep(3.0)

    # Whatever is stashed right now is counted by both reads already. A refusal's
    # delta may include stash it had taken (acknowledged to others): the documented
    # contract hands that to the refused caller, who here does not resubmit it.
    assert ledger.errors == []
    expected = ledger.acknowledged - ledger.refused_stash
    assert_totals(healthy, expected)
    fold_stash(healthy, ledger)
    expected = ledger.acknowledged - ledger.refused_stash
    assert_totals(healthy, expected)
    broken_stats, healthy_stats = merged_stats(broken), merged_stats(healthy)
    report(
        f"stash-race[{sharded_counter_engine}]",
        acknowledged=ledger.acked_calls,
        stashed=broken_stats["stashed"] + healthy_stats["stashed"],
        folded=healthy_stats["folded"],
        refused=ledger.refused_calls,
        refused_stash=ledger.refused_stash,
        causes=ledger.refusal_causes,
    )
    assert broken_stats["stashed"] > 50
    assert healthy_stats["folded"] > 5


# -- 5. shard count changes under load ---------------------------------------------------


def test_changing_shard_counts_under_load_keeps_the_total(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    own_memcache: Callable[..., Any],
) -> None:
    """Counters of one name with 20, 3, 50, 2 (class), 7 and 1 (config) shards, all at once."""
    name = "reshard"
    cache = {"memcache_client": own_memcache()}

    class Small(Counter):
        shards = 2

    config["sharded_counter"] = {"shards": 7}
    counters = [
        Counter(name, shards=20, **cache),
        Counter(name, shards=3, **cache),
        Counter(name, shards=50, **cache),
        Small(name, **cache),
        Counter(name, **cache),  # 7, from config
    ]
    assert [c.shards for c in counters] == [20, 3, 50, 2, 7]
    for counter in counters:
        counter.get_count()  # connect before the clock starts

    ledger = Ledger()
    # Each call picks from the list as it is now: counters added later join in.
    writes = increment_loop(
        ledger, lambda i, k: counters[(i + k) % len(counters)], lambda i, k: i + 1
    )
    with writers_running(WRITERS, writes):
        time.sleep(1.5)
        # Changing config affects counters made afterwards only, while writes go on.
        config["sharded_counter"] = {"shards": 1}
        late = Counter(name, **cache)
        counters.append(late)
        time.sleep(1.5)
    assert late.shards == 1 and counters[4].shards == 7
    for counter in counters:
        fold_stash(counter, ledger)

    assert ledger.errors == [] and ledger.refused_calls == 0
    stats = merged_stats(*counters)
    for counter in counters:
        assert_totals(counter, ledger.acknowledged)
    # Any shard count reads every shard of the name, whoever wrote it.
    assert_totals(Counter(name, shards=1), ledger.acknowledged)
    assert_totals(Small(name), ledger.acknowledged)
    report(
        f"reshard[{sharded_counter_engine}]",
        increments=ledger.acked_calls,
        aborts=stats["aborts"],
        stashed=stats["stashed"],
        folded=stats["folded"],
    )


# -- 6. count = v while others increment --------------------------------------------------


@pytest.mark.parametrize("setter", ["same-process", "apart"])
def test_setting_the_count_is_atomic_with_concurrent_increments(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    own_memcache: Callable[..., Any],
    setter: str,
) -> None:
    """After ``count = v``: v plus exactly the increments ordered after it.

    From outside, an increment that overlaps the set may land on either side. So
    final - v must include every increment that started after the set returned,
    and nothing that had ended before the set started.

    A set holds the writes of its own process ("same-process"); a setter on a
    client of its own ("apart") shares nothing with the writers in this process,
    as one in another process would, so its transaction races every commit.
    """
    counter = Counter("setme", shards=10, memcache_client=own_memcache())
    setting = (
        counter
        if setter == "same-process"
        else Counter("setme", shards=10, memcache_client=own_memcache())
    )
    counter.get_count()
    deltas = random.Random(6).sample(range(1, 1_000_000), WRITERS)
    set_seconds: list[float] = []
    refused_sets = 0
    for value in (10**12, -123_456_789, 0):
        ledger = Ledger()
        writes = increment_loop(ledger, lambda i, k: counter, lambda i, k: deltas[i])
        with writers_running(WRITERS, writes):
            time.sleep(0.4)
            for _ in range(20):
                set_started = time.monotonic()
                try:
                    setting.count = value
                except gexc.Aborted:
                    # Lost to contention after the library's own retries: its transaction
                    # did not commit, so nothing was written. Callers retry; so do we.
                    refused_sets += 1
                    continue
                break
            else:
                pytest.fail(f"count = {value} lost to contention 20 times in a row")
            set_returned = time.monotonic()
            time.sleep(0.4)
        assert ledger.errors == [] and ledger.refused_calls == 0
        set_seconds.append(set_returned - set_started)

        must = sum(d for s, _, d in ledger.events if s > set_returned)
        may = sum(d for _, e, d in ledger.events if e > set_started)
        cached, uncached = counter.count, counter.get_count(nocache=True)
        assert cached == uncached
        assert must > 0, "no increment started after the set returned: the round proves little"
        assert must <= uncached - value <= may, (
            f"count = {value}: total {uncached} is {uncached - value} above it, "
            f"outside [{must}, {may}]"
        )
    report(
        f"set[{sharded_counter_engine}, {setter}]",
        set_seconds=max(set_seconds),
        refused_sets=refused_sets,
    )


def test_writers_hold_back_for_a_dead_setter_only_briefly(
    sharded_counter_env: dict[str, str], own_memcache: Callable[..., Any]
) -> None:
    """A set's marker left by a process that died holds this process's writers back
    for at most two seconds in all, not until the marker's deadline a minute on."""
    client = own_memcache()
    counter = Counter("dead-setter", shards=4, memcache_client=client)
    counter.increment(1)
    assert counter.count == 1
    dead = Stash(0).set_begun("d1", time.time() + 60)  # as a set that never ended leaves it
    client.delete(counter._stash_key)  # the stash now holds that marker alone
    assert client.add(counter._stash_key, dead.encode(), 0)
    counter.increment(1)  # its merge reads the stash key and sees the set
    latencies = []
    for _ in range(5):
        started = time.monotonic()
        counter.increment(1)
        latencies.append(time.monotonic() - started)
    report("dead-setter", first_s=latencies[0], later_max_s=max(latencies[1:]))
    assert 1.5 < latencies[0] < 3.0, f"the first write after seeing it waited {latencies[0]}"
    assert max(latencies[1:]) < 1.0, f"later writes waited again: {latencies}"
    assert_totals(counter, 7)


def test_a_set_that_cannot_reach_delayed_incr_writes_nothing(
    sharded_counter_env: dict[str, str], sharded_counter_cache: Any
) -> None:
    """I6: a set replaces what delayed_incr holds. A setter cut off from the cache (a
    partition: nothing listens where it looks, while the others still reach it)
    cannot take the stash, so it raises CacheUnavailable and writes nothing. Before,
    it went ahead, and the pending 5 was added on top of the set's value (found by
    the simulator: tools/simulate)."""
    counter = Counter("set-cut-off", shards=3)
    counter.increment(10)
    assert counter.defer(5)  # pending in delayed_incr
    cut_off = Counter(
        "set-cut-off", shards=3, cache_url=dead_cache_url(sharded_counter_cache, free_port())
    )
    with pytest.raises(CacheUnavailable):
        cut_off.count = 100
    assert counter.get_count(nocache=True) == 15  # the shards' 10 and the pending 5
    counter.write_pending()
    assert counter.get_count(nocache=True) == 15
    counter.count = 100  # with the cache in reach, the set takes the stash
    counter.write_pending()
    assert counter.get_count(nocache=True) == 100


@pytest.mark.parametrize("outcome", ["fold-lands", "fold-fails", "set-fails", "setter-dies"])
def test_setting_the_count_fences_a_stash_that_a_writer_is_folding(
    sharded_counter_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    own_memcache: Callable[..., Any],
    outcome: str,
) -> None:
    """Increments acknowledged (stashed) before ``count = 0`` must not survive it.

    Instrumentation holds one folding write (it took a stash of 1,000) between the
    take and its shard write, for as long as the test likes: any slow write
    (contention, a retry, a paused process) leaves that window open, longer than any
    deadline. Another 300 is stashed meanwhile. The set runs on a client of its own,
    as another process would, and does not wait: it takes the 300 and fences the
    fold. What the fold took is replaced by the set whether the fold's write lands
    late ("fold-lands": it finds its token in the fence and writes nothing) or fails
    ("fold-fails"). A set that fails (faked: a refused connection on cue) replaces
    nothing. A setter that dies right after its transaction landed (faked: it never
    ends the set) leaves its marker to expire; then the fence on the shards, not a
    clock, shows what it replaced. The backends and the stash are real.
    """
    if outcome == "setter-dies":
        monkeypatch.setattr(outcomes, "FOLD_MARGIN", 0.0)  # its marker expires soon
    name = f"set-vs-fold-{outcome}"
    cache = {"memcache_client": own_memcache()}
    healthy = Counter(name, shards=4, **cache)
    healthy.increment(1)
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = connected(Counter(name, shards=4, **cache, **UNREACHABLE))
    broken.increment(1000)  # acknowledged: stashed in delayed_incr
    if merged_stats(broken)["stashed"] != 1:
        pytest.fail("setup: the increment of 1000 was not stashed")
    assert healthy.count == 1001  # this read also lets the healthy writer see the stash

    holding, release = threading.Event(), threading.Event()
    folder_thread: list[threading.Thread] = []
    setter_thread: list[threading.Thread] = []
    write, rewrite, end_set = ShardStore.add_in_transaction, ShardStore.rewrite, Setter.end_set

    def held(store: ShardStore, *args: Any, **kwargs: Any) -> Any:
        if folder_thread and threading.current_thread() is folder_thread[0]:
            holding.set()
            release.wait(30)
            if outcome in ("fold-fails", "setter-dies"):
                raise gexc.ServiceUnavailable("failed to connect to all addresses")
        return (yield from write(store, *args, **kwargs))

    def refused(store: ShardStore, *args: Any, **kwargs: Any) -> Any:
        if outcome == "set-fails" and threading.current_thread() is setter_thread[0]:
            raise gexc.ServiceUnavailable("failed to connect to all addresses")
        return (yield from rewrite(store, *args, **kwargs))

    def dies(counter: Setter, *args: Any, **kwargs: Any) -> Any:
        if outcome == "setter-dies" and threading.current_thread() is setter_thread[0]:
            return  # as if its process died the moment its transaction landed
        yield from end_set(counter, *args, **kwargs)

    monkeypatch.setattr(ShardStore, "add_in_transaction", held)
    monkeypatch.setattr(ShardStore, "rewrite", refused)
    monkeypatch.setattr(Setter, "end_set", dies)
    folder = threading.Thread(target=healthy.increment, args=(5,))
    folder_thread.append(folder)
    folder.start()
    if not holding.wait(10):
        pytest.fail("setup: the folding write never reached the shard write")
    broken.increment(300)  # acknowledged too: stashed while the fold is in flight
    assert merged_stats(broken)["stashed"] == 2, "setup: the 300 was not stashed"
    set_failed: list[BaseException] = []

    def set_to_zero() -> None:
        setter = Counter(
            name,
            shards=4,
            memcache_client=own_memcache(),
            retry_deadline=1.0,
            rpc_timeout=0.5,
        )
        try:
            setter.count = 0  # begins after the 1000 and the 300 were acknowledged
        except DatastoreUnavailable as exc:  # ours, never the raw google error
            assert isinstance(exc.__cause__, gexc.ServiceUnavailable)
            set_failed.append(exc)

    setter = threading.Thread(target=set_to_zero)
    setter_thread.append(setter)
    setter.start()
    setter.join(30)  # it does not wait for the fold, held however long
    assert not setter.is_alive(), "the set waited for a fold in flight"
    assert bool(set_failed) == (outcome == "set-fails")
    release.set()
    folder.join(30)
    assert not folder.is_alive()
    if outcome == "setter-dies":
        time.sleep(2.5)  # the dead setter's marker expires: nothing else ends its set

    # The +5 overlapped the set: either side is fine, and the fence puts it before.
    expected = {
        "fold-lands": 0,
        "fold-fails": 5,  # its own 5 is stashed after the set
        "set-fails": 1 + 1000 + 5 + 300,
        "setter-dies": 5,
    }[outcome]
    ledger = Ledger()
    fold_stash(healthy, ledger)  # writes resolve what the set left to the fence
    entries = Stash.decode(healthy._backend.cache._client.get(healthy._stash_key))
    report(f"set-vs-fold-{outcome}", expected=expected, unsure_left=len(entries.unsure))
    assert not entries.unsure and entries.setter is None, entries
    assert_totals(healthy, expected + ledger.acknowledged)


def test_a_fold_stalled_past_its_deadline_then_failing_is_counted_once(
    sharded_counter_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    own_memcache: Callable[..., Any],
) -> None:
    """A writer takes a stash of 1,000, then stalls past its fold's deadline while
    another stash lands on the key; then its write fails for certain.

    The stall and the failure are faked (a process paused mid-call, then a refused
    connection): no real process stalls between those two steps on cue. memcached is
    real, and the point is what the key holds: past its deadline the fold is an
    unsure fold part, so the 1,000 is owed while the writer stalls, its late put-back
    changes nothing, and the fold part's resolution writes it once.
    """
    monkeypatch.setattr(outcomes, "FOLD_MARGIN", 0.0)
    counter = Counter(
        "stalled-fold",
        shards=4,
        retry_deadline=0.2,
        rpc_timeout=0.2,
        memcache_client=own_memcache(),
    )
    counter.increment(1)
    assert counter.count == 1
    cache = counter._backend.cache
    cache.stash(counter._stash_key, 1000)

    def stalled_then_refused(self: ShardWriter, amount: int, token: str, **_: Any) -> Any:
        assert amount == 1000 + 7, "setup: the write did not fold the stash"
        time.sleep(1.0)  # the fold's deadline was 0.4 s after the take
        cache.stash(counter._stash_key, 5)  # rewrites the key meanwhile
        refused = gexc.ServiceUnavailable("failed to connect to all addresses")
        raise WriteFailed(Ending.REFUSED, refused)
        yield  # a step function (core/effects.py), as the write it stands in for

    with monkeypatch.context() as patch:
        patch.setattr(ShardWriter, "write", stalled_then_refused)
        counter.increment(7)  # stashed: its own 7; the 1,000 is an unsure fold part
    assert pending_stash(counter) == 1000 + 5 + 7
    ledger = Ledger()
    fold_stash(counter, ledger)
    assert_totals(counter, 1 + 1012 + ledger.acknowledged)


def _fold_then_hold(
    name: str, stage: str, held: Any, go: Any
) -> None:  # pragma: no cover - runs in a spawned process
    """A writer process that takes the stash and then stops at ``stage``, until it is
    killed or told to ``go`` on: "before-commit" (before its shard write) or
    "after-commit" (its write landed; its fold is not settled yet)."""
    from sharded_counter.cache.stashes import PendingStashes

    outcomes.FOLD_MARGIN = 0.0  # its fold's deadline comes 1.5 s after the take
    counter = Counter(name, shards=4, retry_deadline=1.0, rpc_timeout=0.5)
    assert counter.count == 1 + 1000  # the read shows this writer the stash

    def hold() -> None:
        held.set()
        go.wait(120)

    if stage == "before-commit":
        write = ShardStore.add_in_transaction

        def held_write(store: ShardStore, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("folded"):
                hold()
            return write(store, *args, **kwargs)

        ShardStore.add_in_transaction = held_write  # type: ignore[method-assign]
    else:
        settle = PendingStashes.settle_fold

        # The cache tier's calls are steps (core/effects.py): so is this one.
        def held_settle(stashes: PendingStashes, *args: Any, **kwargs: Any) -> Any:
            hold()
            return (yield from settle(stashes, *args, **kwargs))

        PendingStashes.settle_fold = held_settle  # type: ignore[method-assign]
    counter.increment(5)


@pytest.mark.parametrize("fate", ["killed-before-commit", "killed-after-commit", "wakes-late"])
def test_a_writer_that_vanishes_mid_fold_neither_loses_nor_doubles_what_it_took(
    sharded_counter_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    own_memcache: Callable[..., Any],
    fate: str,
) -> None:
    """A writer process takes a stash of 1,000 to fold into its +5, and vanishes.

    It is SIGKILLed before its shard write ("killed-before-commit": the 1,000 is in no
    shard) or after it landed, before it settled its fold ("killed-after-commit": the
    1,000 is in a shard, under its token). Or it is held before its shard write until
    its fold has been resolved without it, and then carries on ("wakes-late": it must
    write its 5 alone). The child is held at those points by instrumentation in it,
    since a process does not stop there on cue; the kill is a real SIGKILL, and the
    backends and the stash are real. Past the fold's deadline, healthy writes resolve
    it: one transaction over every shard that looks for the writer's token.
    """
    name = f"vanished-fold-{fate}"
    counter = Counter(name, shards=4, memcache_client=own_memcache())
    counter.increment(1)
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = connected(Counter(name, shards=4, memcache_client=own_memcache(), **UNREACHABLE))
    broken.increment(1000)  # acknowledged: stashed in delayed_incr
    if merged_stats(broken)["stashed"] != 1:
        pytest.fail("setup: the increment of 1000 was not stashed")

    ctx = multiprocessing.get_context("spawn")
    held, go = ctx.Event(), ctx.Event()
    stage = "after-commit" if fate == "killed-after-commit" else "before-commit"
    child = ctx.Process(target=_fold_then_hold, args=(name, stage, held, go))
    child.start()
    try:
        if not held.wait(60):
            pytest.fail("setup: the writer process never reached the point to hold at")
        taken = Stash.decode(counter._backend.cache._client.get(counter._stash_key))
        assert [f.amount for f in taken.folds.values()] == [1000], taken
        if fate != "wakes-late":
            os.kill(child.pid, signal.SIGKILL)
            child.join(10)
        time.sleep(1.6)  # past the fold's deadline
        ledger = Ledger()
        fold_stash(counter, ledger)  # writes resolve the vanished writer's fold part
        if fate == "wakes-late":
            go.set()
            child.join(30)
            assert child.exitcode == 0, "the writer that woke late failed"
    finally:
        if child.is_alive():
            child.kill()
            child.join(10)
    own = {"killed-before-commit": 0, "killed-after-commit": 5, "wakes-late": 5}[fate]
    left = Stash.decode(counter._backend.cache._client.get(counter._stash_key))
    report(f"vanished-fold-{fate}", expected=1 + 1000 + own, unsure_left=len(left.unsure))
    assert not left.unsure and not left.folds, left
    assert_totals(counter, 1 + 1000 + own + ledger.acknowledged)


def _write_until_stopped(
    name: str, threads: int, stop: Any, out: Any
) -> None:  # pragma: no cover - runs in a spawned process
    """A second writer process: ``threads`` threads incrementing by 1 until ``stop``."""
    counter = Counter(name, shards=20)
    ledger = Ledger()
    ledger.increment(counter, 1)
    body = increment_loop(ledger, lambda i, k: counter, lambda i, k: 1)
    workers = [threading.Thread(target=swallow, args=(body, i, stop)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put((ledger.events, [repr(e) for e in ledger.errors]))


def test_a_vanished_writers_fold_part_is_resolved_under_load(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
) -> None:
    """16 writers in 2 processes keep every shard busy while a fold marker of 1,000 is
    past its deadline, as a writer killed mid-fold leaves it (planted here; the kill
    itself is tested above). The fold part's transaction reads and writes every shard,
    so on the classic emulator every shard write can abort it; it must still get
    through, and the total must be exact."""
    name = "vanished-fold-under-load"
    counter = Counter(name, shards=20)
    ledger = Ledger()
    ledger.increment(counter, 1)
    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    other = ctx.Process(target=_write_until_stopped, args=(name, WRITERS // 2, stop, out))
    other.start()
    resolved_after = None
    try:
        body = increment_loop(ledger, lambda i, k: counter, lambda i, k: 1)
        with writers_running(WRITERS // 2, body):
            time.sleep(2.0)  # both processes writing
            client = counter._backend.cache._client
            dead = Stash(0, {"6b000000deadbeef": Fold(1000, time.time() - 1)})
            assert client.add(counter._stash_key, dead.encode(), noreply=False)
            began = time.monotonic()
            while time.monotonic() - began < 60:
                left = Stash.decode(client.get(counter._stash_key)).live()
                if not (left.unsure or left.folds):
                    resolved_after = time.monotonic() - began
                    break
                time.sleep(0.05)
    finally:
        stop.set()
        events, errors = out.get(timeout=60)
        other.join(30)
    ledger.add_events(events)
    report(
        f"vanished-fold-under-load[{sharded_counter_engine}]",
        resolved_s=resolved_after if resolved_after is not None else -1.0,
        increments=ledger.acked_calls,
        max_call_s=ledger.max_latency(),
    )
    assert errors == [] and ledger.errors == []
    assert resolved_after is not None, "the fold part was not resolved in 60 s"
    assert_totals(counter, 1000 + ledger.acknowledged)


@pytest.mark.one_cache_server
def test_a_stash_taken_by_a_cas_whose_reply_was_lost_is_put_back(
    sharded_counter_env: dict[str, str],
    sharded_counter_cache: Any,
    monkeypatch: pytest.MonkeyPatch,
    own_memcache: Callable[..., Any],
) -> None:
    """The take's ``cas`` reaches memcached and is applied; its reply never comes back.

    The writer cannot know it took the stash, so it writes without it; the marker
    the take left is how a later cache call finds the amount and puts it back.
    memcached is real and applies the cas; a relay holds back just that reply.
    """
    name = "lost-take"
    relay = ReplyHoldingRelay(sharded_counter_cache.host, sharded_counter_cache.port)
    try:
        url = cache_url_through(sharded_counter_cache, "127.0.0.1", relay.port)
        through_relay = build_client(Settings(cache_url=url, **FAST_MEMCACHE))
        with monkeypatch.context() as patch:
            patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
            broken = connected(
                Counter(name, shards=4, memcache_client=own_memcache(), **UNREACHABLE)
            )
        broken.increment(1000)  # acknowledged: stashed in delayed_incr
        healthy = Counter(name, shards=4, memcache_client=through_relay, **FAST_MEMCACHE)
        assert healthy.count == 1000  # and now this writer knows there is a stash

        real_cas = through_relay.cas
        lost = []

        def cas_losing_its_reply(key: str, *args: Any, **kwargs: Any) -> Any:
            if key == healthy._stash_key and not lost:
                lost.append(key)
                relay.hold.set()
                try:
                    return real_cas(key, *args, **kwargs)
                finally:
                    relay.hold.clear()
            return real_cas(key, *args, **kwargs)

        monkeypatch.setattr(through_relay, "cas", cas_losing_its_reply)
        healthy.increment(5)  # its take times out: it writes 5 alone
        assert lost, "setup: the take never reached its cas"
        # Its merge put the 1000 back; without the take's marker it would be gone.
        assert healthy._backend.store.run(healthy._backend.store.snapshot(name)).total == 5
        assert healthy._backend.cache.peek_stash(healthy._stash_key) == 1000
        assert healthy.get_count(nocache=True) == 1005
        assert healthy.count == 1005
        healthy.increment(1)  # and this write folds it in
        assert healthy.get_count(nocache=True) == 1006
        assert healthy.count == 1006
    finally:
        relay.close()


# -- 7. hostile names -------------------------------------------------------------------

hostile_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=24)


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(names=st.lists(hostile_names, min_size=1, max_size=3, unique=True))
@example(names=["with spaces", "new\nline\r\n", "tab\tnul\x00del\x7f\x1b[0m"])
@example(names=["__reserved__", "__reserved__ ", "__key__"])
@example(names=["x" * 1500, "x" * 1499 + "y", "é" * 750])  # 1500 bytes each
@example(names=["😀" * 375, "a1", "a"])  # 'a1' shard 1 vs 'a' shard 11 in the original
def test_hostile_names_count_apart(sharded_counter_env: dict[str, str], names: list[str]) -> None:
    counters = [Counter(n, shards=12) for n in names]
    for counter in counters:
        counter.delete()  # leftovers of an earlier example (hypothesis replays names)
    deltas = [7 * 10**i + 1 for i in range(len(names))]
    for counter, delta in zip(counters, deltas, strict=True):
        for _ in range(3):  # several shards of each name get written
            counter.increment(delta)
    for counter, delta in zip(counters, deltas, strict=True):
        assert_totals(counter, 3 * delta)
        assert_totals(Counter(counter.name, shards=2), 3 * delta)  # a fresh object agrees
    assert counters[0].delete() >= 1
    assert_totals(counters[0], 0)
    for counter, delta in zip(counters[1:], deltas[1:], strict=True):
        assert_totals(counter, 3 * delta)  # deleting one name leaves the others alone
        assert counter.delete() >= 1
        assert_totals(counter, 0)


def test_a_call_in_flight_when_memcache_went_down_does_not_end_the_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outage is logged once when it starts and once when it ends. A call sent before
    it began may still come back answered after another thread saw the failure (16
    writers, memcache killed mid-call: a Redis CI run logged the outage twice); that
    says nothing of memcache now, so only a call sent after the outage began ends it."""
    caplog.set_level(logging.WARNING, logger="sharded_counter")
    outage = OutageLog()
    in_flight = time.monotonic() - 1.0  # sent before the failure below
    outage.failed(ConnectionRefusedError("refused"), "reading totals from Datastore")
    outage.answered(in_flight)
    assert warnings_containing(caplog, "answers again") == 0
    outage.answered(time.monotonic())
    assert warnings_containing(caplog, "answers again") == 1
    assert warnings_containing(caplog, "memcache is unavailable") == 1


def test_a_transform_queued_behind_a_lock_past_its_deadline_counts_once(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
) -> None:
    """W6' on the real emulator. Another transaction holds the only shard's lock (a
    read in a read-write transaction, as a set or a resolution does) for 1 s. A +5
    goes there as a transform, waits on the lock, and its caller hears
    DeadlineExceeded at 0.5 s. The emulator keeps the commit queued and applies it
    once the lock is free, past the deadline. When the retry only waited for that
    deadline, it found no token and wrote the 5 again: 11, not 6, every run. Now the
    transform is committed in a transaction of its own, and the retry looks for its
    token only once a rollback of that transaction has answered, which the emulator
    does only after the queued commit has landed."""
    if sharded_counter_engine != "firestore":
        pytest.skip("only Firestore in Datastore mode applies transforms")
    counter = Counter("queued-transform", shards=1, max_shards=1, rpc_timeout=0.5)
    counter.increment(1)
    store = counter._backend.store
    key = store.key("queued-transform", 0)
    lock = store.run(store.begin())
    store.run(store.lookup([key], transaction=lock))
    release = threading.Timer(1.0, lambda: store.run(store.rollback(lock)))
    release.start()
    try:
        counter.increment(5)  # returns: its retry landed
    finally:
        release.join(10)
    time.sleep(1.0)  # nothing of this process is in flight any more
    counter.write_pending()
    assert_totals(counter, 6)


def test_an_unsure_transform_is_fenced_by_the_process_that_resolves_it(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
) -> None:
    """W6' across processes. A +5 goes to the only shard as a transform while another
    transaction holds its lock for 1.7 s; its caller hears DeadlineExceeded at 0.3 s,
    and its rollbacks go unanswered (the emulator answers them once the queued
    commit settles) until the write's 0.7 s of retries are over. So it is kept
    unsure, its entry naming its transaction. Another process then resolves the
    entry while the commit still waits: it rolls the transaction back first, which
    answers once the commit has landed, finds the token, and adds nothing: 6."""
    if sharded_counter_engine != "firestore":
        pytest.skip("only Firestore in Datastore mode applies transforms")
    name = "unsure-transform"
    spawn = multiprocessing.get_context("spawn")
    ready, go = spawn.Event(), spawn.Event()
    resolver = spawn.Process(target=_resolve_when_told, args=(name, ready, go))
    resolver.start()
    try:
        assert ready.wait(60), "setup: the other process did not start"
        counter = Counter(name, shards=1, max_shards=1, rpc_timeout=0.3, retry_deadline=0.7)
        counter.increment(1)
        store = counter._backend.store
        lock = store.run(store.begin())
        store.run(store.lookup([store.key(name, 0)], transaction=lock))
        release = threading.Timer(1.7, lambda: store.run(store.rollback(lock)))
        release.start()
        counter.increment(5)  # kept unsure: its transform may still land
        (entry,) = Stash.decode(
            counter._backend.cache._client.get(counter._stash_key)
        ).unsure.values()
        assert entry.transaction, "setup: the write was fenced before it gave up"
        assert release.is_alive(), "setup: the lock was freed before the entry was kept"
        go.set()  # resolves while the commit still waits on the lock
        release.join(10)
        resolver.join(60)
    finally:
        go.set()
        resolver.join(60)
    assert resolver.exitcode == 0, "setup: the other process failed"
    assert_totals(counter, 6)


def _resolve_when_told(name: str, ready: Any, go: Any) -> None:  # pragma: no cover - spawned
    counter = Counter(name, shards=1, max_shards=1)
    counter.get_count(nocache=True)  # connected and probed before the clock starts
    ready.set()
    go.wait(60)
    counter.write_pending()  # claims the unsure entry and resolves it


def test_an_entry_lost_while_claimed_finds_its_token_where_its_resolver_looks(
    sharded_counter_env: dict[str, str],
    sharded_counter_cache: Any,
    relay: ReplyHoldingRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """S5'' on the real backends (found by the simulator, seed 9147; docs/protocol.md).

    This process's +7 lands with its reply lost (the relay holds it), so it is kept
    unsure: its token in our slot, its entry in delayed_incr. Another process claims
    the entry and stops before it looks for the token. memcached is flushed: the
    entry is gone. This process resolves, sees no entry, and writes +1 nine times to
    the same shard (one transform on Firestore, or enough transactions on the classic
    engine, to push an unpinned token out of our slot). Had it let the token go, the
    other process's resolution, going on, would find no token and add the 7 again:
    24, not 17. The token lingers for a claim's lifetime instead."""
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
    probe_through_relay()  # with the default time limits
    name = "claimed-then-flushed"
    counter = Counter(name, shards=1, max_shards=1, rpc_timeout=2.0, retry_attempts=1)
    counter.increment(1)
    held = lose_the_next_commit_reply(monkeypatch, relay)
    counter.increment(7)  # landed, reply lost: kept unsure
    assert held.is_set() and counter.stats.snapshot()["unsure"] == 1, "setup: no unsure +7"
    spawn = multiprocessing.get_context("spawn")
    claimed, go = spawn.Event(), spawn.Event()
    resolver = spawn.Process(target=_claim_then_wait, args=(name, claimed, go))
    resolver.start()
    try:
        assert claimed.wait(60), "setup: the other process claimed nothing"
        sharded_counter_cache.flush_all()
        time.sleep(1.2)  # past the pause after a resolution (paths/unsure.py)
        counter.write_pending()  # sees its entry gone
        for _ in range(9):
            counter.increment(1)
    finally:
        go.set()
        resolver.join(60)
    assert resolver.exitcode == 0, "setup: the other process failed"
    total = counter.get_count(nocache=True)
    report("claimed-then-flushed", ledger=17, total=total)
    assert total == 17


def _claim_then_wait(name: str, claimed: Any, go: Any) -> None:  # pragma: no cover - spawned
    """Another process: claims the unsure entry, says so, and waits for ``go`` before its
    resolution looks for the write's token (then resolves it as usual)."""
    from sharded_counter.paths.unsure import UnsureResolver

    resolve_one = UnsureResolver._resolve_one

    def paused(self: UnsureResolver, token: str, entry: Any) -> Any:
        claimed.set()
        go.wait(60)
        return (yield from resolve_one(self, token, entry))

    UnsureResolver._resolve_one = paused  # type: ignore[method-assign]
    counter = Counter(name, shards=1, max_shards=1, rpc_timeout=2.0, retry_attempts=1)
    counter.write_pending()
    assert claimed.is_set()
