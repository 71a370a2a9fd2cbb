"""The error contract and idempotency keys under lost replies, on the real backends.

The fault is a TCP relay between the client and the real emulator that passes
every request on but holds back every reply for 4 s, twice (``faultkit.py``):
commits land while their callers time out, which is the case Google documents
as a non-idempotent commit. The relay is a fault injector, not a fake: the
emulator receives and applies everything. Each test keeps a ledger of what the
callers were told, and checks the contract of ``errors.py`` against the final
total:

    acknowledged  <=  total  <=  acknowledged + outcome unknown

and that no caller saw an error outside the contract. Keyed deliveries are
retried with their key until they return, as an at-least-once sender would:
their total must be exact.

Run with ``-s`` to see the measured numbers (lines starting ``[faults]``).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from cachekit import cache_url_through
from faultkit import (
    Ledger,
    ReplyHoldingRelay,
    connected,
    merged_stats,
    probe_through_relay,
    report,
    writers_running,
)
from google.api_core import exceptions as gexc

from sharded_counter import (
    Counter,
    CounterBuffer,
    DatastoreUnavailable,
    IncrementNotRecorded,
    IncrementOutcomeUnknown,
    Settings,
)
from sharded_counter.cache.client import build_client
from sharded_counter.core.stash import Stash
from sharded_counter.settings import resolve
from sharded_counter_emulator import free_port

pytestmark = pytest.mark.backends

WRITERS = 16
HOLD_S = 4.0  # each spell of swallowed replies
# The setup: replies lost for longer than a write's whole retry deadline.
RELAY_OPTIONS: dict[str, Any] = {"shards": 20, "rpc_timeout": 1.0, "retry_deadline": 2.5}
NO_MEMCACHE: dict[str, Any] = {"memcached_hosts": ()}
NO_GROUP_COMMIT: dict[str, Any] = {"max_concurrent_writes": 64, "group_commit": False}


def swallow_replies_twice(relay: ReplyHoldingRelay) -> tuple[float, float]:
    """Two spells of ``HOLD_S`` in which the relay passes requests on and holds every
    reply; returns when the first began and the last ended (monotonic)."""
    time.sleep(1.0)
    began = time.monotonic()
    for spell in range(2):
        relay.hold.set()
        try:
            time.sleep(HOLD_S)
        finally:
            relay.hold.clear()
        if spell == 0:
            time.sleep(1.5)
    ended = time.monotonic()
    time.sleep(1.0)  # writes after the fault: folds and resolutions happen here
    return began, ended


def settle(counter: Counter) -> int:
    """Heal what memcache keeps (stash, unsure writes), then the total from the shards."""
    if counter._backend.cache.enabled:
        verification = counter.repair()
        assert verification.pending == 0, f"left in delayed_incr after repair: {verification}"
    return counter.get_count(nocache=True)


def assert_within_contract(ledger: Ledger, total: int, label: str, **extra: Any) -> None:
    report(
        label,
        acknowledged=ledger.acked_calls,
        not_recorded=ledger.refused_calls,
        outcome_unknown=ledger.unknown_calls,
        unknown_counted=total - ledger.acknowledged,
        **extra,
    )
    assert ledger.errors == [], f"errors outside the contract: {ledger.errors[:3]}"
    assert ledger.acknowledged <= total, f"lost {ledger.acknowledged - total} acknowledged"
    assert total <= ledger.acknowledged + ledger.unknown, (
        f"total {total} exceeds acknowledged {ledger.acknowledged} + outcome unknown "
        f"{ledger.unknown}: an increment reported as not recorded was counted"
    )


@pytest.mark.parametrize("memcache", ["memcache", "no-memcache"])
@pytest.mark.parametrize("grouping", ["group-commit", "no-group-commit"])
def test_lost_replies_get_an_honest_answer(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    relay: ReplyHoldingRelay,
    monkeypatch: pytest.MonkeyPatch,
    memcache: str,
    grouping: str,
) -> None:
    """16 threads on one ``Counter(shards=20)`` while every reply is swallowed twice.

    Without memcache nothing can be kept for later, so a write whose outcome stayed
    unknown must say so (``IncrementOutcomeUnknown``), for every member of a group,
    and not claim it was not recorded. With memcache such writes are kept as unsure
    entries, resolved by token, and the total is exact.
    """
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
    probe_through_relay()  # with the default time limits
    options = {**RELAY_OPTIONS}
    if memcache == "no-memcache":
        options.update(NO_MEMCACHE)
    if grouping == "no-group-commit":
        options.update(NO_GROUP_COMMIT)
    counter = Counter(f"relay-{memcache}-{grouping}", **options)
    counter.increment(1)  # connect through the relay before the fault
    ledger = Ledger(unknown_allowed=True)
    ledger.add_events([(0.0, 0.0, 1)])

    def write(i: int, stop: threading.Event) -> None:
        while not stop.is_set():
            ledger.increment(counter, 1)

    with writers_running(WRITERS, write):
        swallow_replies_twice(relay)
    total = settle(counter)
    stats = merged_stats(counter)
    assert_within_contract(
        ledger,
        total,
        f"lost-replies[{sharded_counter_engine},{memcache},{grouping}]",
        unsure=stats["unsure"],
        resolved=stats["resolved"],
        stashed=stats["stashed"],
    )
    # The spells must catch writes. Which call of a write they catch is chance: on
    # Firestore a transform's BeginTransaction (nothing written: stashed, or without
    # memcache not recorded) or its commit (in doubt: fenced, kept unsure if the fence
    # is not answered either, or without memcache outcome unknown). With one write
    # in flight (group commit), both spells caught a BeginTransaction in one run.
    if memcache == "memcache":
        # Every write whose outcome was unknown was kept and resolved: nothing in doubt.
        assert ledger.unknown_calls == 0 and ledger.refused_calls == 0
        assert stats["unsure"] + stats["stashed"] > 0, "setup: no write met a lost reply"
        if grouping == "no-group-commit":  # 16 in flight: some commit is always caught
            assert stats["unsure"] > 0, "setup: no write was left with an unknown outcome"
        assert total == ledger.acknowledged
    else:
        assert ledger.unknown_calls + ledger.refused_calls > 0, "setup: no write met a lost reply"
        if grouping == "no-group-commit":
            assert ledger.unknown_calls > 0, "setup: no write was left with an unknown outcome"


def _child_writer(
    relay_port: int,
    name: str,
    options: dict[str, Any],
    threads: int,
    ready: Any,
    stop: Any,
    out: Any,
) -> None:  # pragma: no cover - runs in a spawned process
    """A second process writing the same counter through the same relay until ``stop``."""
    os.environ["DATASTORE_EMULATOR_HOST"] = f"127.0.0.1:{relay_port}"
    counter = Counter(name, **options)
    counter.get_count()  # connect before the fault
    ready.set()
    ledger = Ledger(unknown_allowed=True)

    def write(i: int, halt: threading.Event) -> None:
        while not halt.is_set() and not stop.is_set():
            ledger.increment(counter, 1)

    with writers_running(threads, write):
        stop.wait(120)
    out.put(
        {
            "acknowledged": ledger.acknowledged,
            "unknown": ledger.unknown,
            "unknown_calls": ledger.unknown_calls,
            "refused_calls": ledger.refused_calls,
            "errors": [repr(e) for e in ledger.errors],
            "stats": merged_stats(counter),
        }
    )


@pytest.mark.parametrize("memcache", ["memcache", "no-memcache"])
def test_lost_replies_get_an_honest_answer_in_two_processes(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    relay: ReplyHoldingRelay,
    monkeypatch: pytest.MonkeyPatch,
    memcache: str,
) -> None:
    """The same fault with 2 processes x 8 threads on the counter; each keeps a ledger."""
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
    options = {**RELAY_OPTIONS, **(NO_MEMCACHE if memcache == "no-memcache" else {})}
    name = f"relay-2p-{memcache}"
    counter = Counter(name, **options)
    counter.increment(1)
    ledger = Ledger(unknown_allowed=True)
    ledger.add_events([(0.0, 0.0, 1)])
    context = multiprocessing.get_context("spawn")
    ready, stop, out = context.Event(), context.Event(), context.Queue()
    child = context.Process(
        target=_child_writer,
        args=(relay.port, name, options, WRITERS // 2, ready, stop, out),
        daemon=True,
    )
    child.start()
    try:
        assert ready.wait(60), "the second process did not start"

        def write(i: int, halt: threading.Event) -> None:
            while not halt.is_set():
                ledger.increment(counter, 1)

        with writers_running(WRITERS // 2, write):
            swallow_replies_twice(relay)
            stop.set()
        theirs = out.get(timeout=60)
    finally:
        stop.set()
        child.join(30)
        if child.is_alive():
            child.kill()
    assert theirs["errors"] == [], theirs["errors"][:3]
    ledger.acknowledged += theirs["acknowledged"]
    ledger.unknown += theirs["unknown"]
    ledger.unknown_calls += theirs["unknown_calls"]
    ledger.refused_calls += theirs["refused_calls"]
    total = settle(counter)
    stats = merged_stats(counter)
    child_stats = theirs["stats"]
    assert_within_contract(
        ledger,
        total,
        f"lost-replies-2p[{sharded_counter_engine},{memcache}]",
        unsure=stats["unsure"] + child_stats["unsure"],
    )
    # As in the test above: with group commit, the spells may catch only transforms'
    # BeginTransaction calls on Firestore (stashed, or not recorded), no commit.
    if memcache == "memcache":
        assert ledger.unknown_calls == 0 and ledger.refused_calls == 0
        kept = stats["unsure"] + child_stats["unsure"] + stats["stashed"] + child_stats["stashed"]
        assert kept > 0, "setup: no write met a lost reply"
        assert total == ledger.acknowledged
    else:
        assert ledger.unknown_calls + ledger.refused_calls > 0, "setup: no write met a lost reply"


# -- idempotency keys ---------------------------------------------------------------


def deliveries(messages: int, seed: int) -> tuple[list[tuple[str, int]], int]:
    """Each message delivered 1 to 3 times, shuffled; and the sum over distinct messages."""
    rng = random.Random(seed)
    sent: list[tuple[str, int]] = []
    for i in range(messages):
        message = (f"msg-{i}", i % 7 + 1)
        sent += [message] * rng.randint(1, 3)
    rng.shuffle(sent)
    return sent, sum(i % 7 + 1 for i in range(messages))


def deliver_until_acknowledged(
    counter: Counter, key: str, delta: int, tally: dict[str, int], lock: threading.Lock
) -> None:
    """What an at-least-once sender does: retry with the same key until it returns."""
    while True:
        try:
            counter.increment(delta, idempotency_key=key)
        except (IncrementNotRecorded, IncrementOutcomeUnknown) as exc:
            with lock:
                tally[type(exc).__name__] = tally.get(type(exc).__name__, 0) + 1
            time.sleep(0.05)
            continue
        return


def _deliver_in_child(
    name: str, sent: Sequence[tuple[str, int]], threads: int, start: Any, out: Any
) -> None:  # pragma: no cover - runs in a spawned process
    counter = Counter(name, shards=20)
    counter.get_count()  # connect before the clock starts
    out.put("ready")
    start.wait(60)
    out.put(_deliver_all(counter, sent, threads))


def _deliver_all(
    counter: Counter,
    sent: Sequence[tuple[str, int]],
    threads: int,
    midway: Callable[[], None] = lambda: None,
) -> dict[str, int]:
    tally: dict[str, int] = {}
    lock = threading.Lock()
    parts = [sent[i::threads] for i in range(threads)]
    half = threading.Barrier(threads + 1)

    def run(part: Sequence[tuple[str, int]]) -> None:
        for n, (key, delta) in enumerate(part):
            if n == len(part) // 2:
                half.wait(60)
            deliver_until_acknowledged(counter, key, delta, tally, lock)

    workers = [threading.Thread(target=run, args=(part,)) for part in parts]
    for worker in workers:
        worker.start()
    half.wait(60)
    midway()
    for worker in workers:
        worker.join(120)
    assert not any(w.is_alive() for w in workers)
    return tally


def _replay_in_child(name: str, sent: Sequence[tuple[str, int]], out: Any) -> None:
    """A process that starts after the others ended, replaying keys they applied."""
    counter = Counter(name, shards=20)  # pragma: no cover - runs in a spawned process
    for key, delta in sent:
        counter.increment(delta, idempotency_key=key)
    out.put(counter.stats.snapshot()["keys_applied"])


def test_messages_delivered_up_to_three_times_count_once(
    sharded_counter_env: dict[str, str], sharded_counter_engine: str, sharded_counter_cache: Any
) -> None:
    """1,500 messages delivered 1-3 times each, from 16 threads in this process and 8 in
    another, with memcache flushed midway; then a fresh process replays 300 of them."""
    name = "deliveries"
    sent, expected = deliveries(1500, seed=13)
    ours, theirs = sent[: len(sent) // 2], sent[len(sent) // 2 :]
    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    child = context.Process(target=_deliver_in_child, args=(name, theirs, 8, start, out))
    child.start()
    try:
        assert out.get(timeout=60) == "ready"
        counter = Counter(name, shards=20)
        counter.get_count()
        start.set()
        began = time.monotonic()
        our_tally = _deliver_all(counter, ours, WRITERS, midway=sharded_counter_cache.flush_all)
        their_tally = out.get(timeout=120)
        seconds = time.monotonic() - began
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    total, cached = counter.get_count(nocache=True), counter.count
    report(
        f"keyed-deliveries[{sharded_counter_engine}]",
        deliveries=len(sent),
        messages=1500,
        expected=expected,
        total=total,
        retries=sum(our_tally.values()) + sum(their_tally.values()),
        seconds=seconds,
    )
    assert (total, cached) == (expected, expected)

    replayer = context.Process(target=_replay_in_child, args=(name, sent[:300], out))
    replayer.start()
    replayer.join(60)
    assert replayer.exitcode == 0
    assert out.get(timeout=10) == 0  # not one of them counted again
    assert counter.get_count(nocache=True) == expected


def test_keyed_deliveries_retried_through_lost_replies_count_exactly(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    relay: ReplyHoldingRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keyed deliveries from 16 threads while every reply is swallowed twice; each caller
    retries with the same key on any error. Exact: the key record decides, not a guess."""
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
    counter = Counter("keyed-relay", **RELAY_OPTIONS)
    counter.get_count()
    keys = iter(range(10**9))
    taken = threading.Lock()
    applied: list[int] = []
    tally: dict[str, int] = {}

    def write(i: int, stop: threading.Event) -> None:
        while not stop.is_set():
            with taken:
                n = next(keys)
            deliver_until_acknowledged(counter, f"k{n}", n % 5 + 1, tally, taken)
            with taken:
                applied.append(n % 5 + 1)

    with writers_running(WRITERS, write):
        swallow_replies_twice(relay)
    total = counter.get_count(nocache=True)
    report(
        f"keyed-lost-replies[{sharded_counter_engine}]",
        delivered=len(applied),
        not_recorded=tally.get("IncrementNotRecorded", 0),
        outcome_unknown=tally.get("IncrementOutcomeUnknown", 0),
        total=total,
    )
    assert tally.get("IncrementOutcomeUnknown", 0) > 0, "setup: no keyed write was in doubt"
    assert total == sum(applied)


def test_a_request_the_server_refuses_is_not_recorded_and_no_raw_error_escapes(
    sharded_counter_env: dict[str, str],
) -> None:
    """A refusal no retry cures (here the INVALID_ARGUMENT for a write in a reserved
    namespace; both engines, and their in-memory models, still answer queries there) is certain:
    IncrementNotRecorded, not stashed. A set raises DatastoreUnavailable. The google
    error is kept as the cause."""
    counter = Counter("refused", namespace="__reserved__", retry_deadline=1.0)
    for keyed in (None, "k"):
        with pytest.raises(IncrementNotRecorded) as refused:
            counter.increment(3, idempotency_key=keyed)
        assert isinstance(refused.value.__cause__, gexc.InvalidArgument)
    assert counter._pending_stash() == 0
    with pytest.raises(DatastoreUnavailable) as failed:
        counter.count = 5
    assert isinstance(failed.value.__cause__, gexc.InvalidArgument)
    assert counter.get_count(nocache=True) == 0


@pytest.mark.needs_processes
def test_reads_sets_and_deletes_with_datastore_unreachable_raise_ours(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listens at the Datastore address: every public call that needs it raises
    one of our errors, with the google error as its cause."""
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    counter = Counter(
        "unreachable",
        write_mode="transaction",  # no probe
        retry_attempts=1,
        retry_deadline=0.3,
        rpc_timeout=0.3,
    )
    calls: list[tuple[str, Callable[[], object]]] = [
        ("get_count", lambda: counter.get_count(nocache=True)),
        ("get_counts", lambda: Counter.get_counts(["unreachable"], nocache=True)),
        ("set_count", lambda: counter.set_count(3)),
        ("delete", counter.delete),
        ("verify", counter.verify),
    ]
    for label, call in calls:
        with pytest.raises(DatastoreUnavailable) as failed:
            call()
        assert isinstance(failed.value.__cause__, gexc.ServiceUnavailable), label


# -- the write buffer and the stash --------------------------------------------------


def test_a_buffer_flush_whose_outcome_was_unknown_is_retried_with_its_key(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    relay: ReplyHoldingRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No memcache, and the flush's commit lands while its reply is held past every retry:
    the flush raises IncrementOutcomeUnknown and keeps the amount. The next flush sends it
    again under the same key, finds it applied, and counts nothing more."""
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
    options = {**NO_MEMCACHE, "shards": 4, "rpc_timeout": 0.5, "retry_deadline": 1.0}
    probe_through_relay()
    Counter("buffered", **options).get_count()  # connect first
    buffer = CounterBuffer(interval=60, **options)
    buffer.increment("buffered", 7)
    relay.hold.set()
    try:
        with pytest.raises(IncrementOutcomeUnknown):
            buffer.flush("buffered")
    finally:
        relay.hold.clear()
    assert buffer.pending("buffered") == 7  # kept: it may or may not have landed
    buffer.increment("buffered", 2)  # a new amount, flushed after the retried batch
    buffer.flush()
    buffer.flush()
    total = Counter("buffered", **options).get_count(nocache=True)
    report(
        f"buffer-unknown-flush[{sharded_counter_engine}]",
        total=total,
        pending=buffer.pending("buffered"),
    )
    assert (total, buffer.pending("buffered")) == (9, 0)  # 16 without the key


class HeldCas:
    """A memcache client whose ``cas`` calls go out with the relay holding replies: the
    real memcached behind the relay applies them; the client times out."""

    def __init__(self, client: Any, relay: ReplyHoldingRelay) -> None:
        self._client, self._relay = client, relay

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name not in ("cas", "add"):
            return attribute

        def held(*args: Any, **kwargs: Any) -> Any:
            self._relay.hold.set()
            try:
                return attribute(*args, **kwargs)
            finally:
                time.sleep(0.3)  # past memcache_timeout
                self._relay.hold.clear()

        return held


@pytest.mark.one_cache_server
def test_a_stash_whose_reply_was_lost_is_outcome_unknown_not_not_recorded(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    sharded_counter_cache: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Datastore refuses the write (nothing listens), so the increment goes to the stash;
    the stash's cas reaches the cache (through a relay) and is applied, but its reply is
    held past the timeout. The increment may well be counted: IncrementOutcomeUnknown,
    never IncrementNotRecorded."""
    mc_relay = ReplyHoldingRelay(sharded_counter_cache.host, sharded_counter_cache.port)
    try:
        timeouts = {"memcache_timeout": 0.2, "memcache_connect_timeout": 0.2}
        url = cache_url_through(sharded_counter_cache, "127.0.0.1", mc_relay.port)
        client = build_client(Settings(cache_url=url, **timeouts))
        # One add and one cas with replies on first: Redis then holds our scripts, so the
        # held call below runs (a first EVALSHA is refused NOSCRIPT, and ran nothing).
        warm = f"warm-{uuid.uuid4().hex}"
        assert client.add(warm, b"1") is True
        assert client.cas(warm, b"2", client.gets(warm)[1]) is True
        with monkeypatch.context() as patch:
            patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
            broken = connected(
                Counter(
                    "stash-reply-lost",
                    write_mode="transaction",
                    retry_attempts=1,
                    retry_deadline=0.3,
                    rpc_timeout=0.3,
                    memcache_client=HeldCas(client, mc_relay),
                )
            )
        with pytest.raises(IncrementOutcomeUnknown) as unknown:
            broken.increment(5)
        assert unknown.value.delta == 5
        healthy = Counter("stash-reply-lost")
        counted = healthy.get_count(nocache=True)
        report(f"stash-reply-lost[{sharded_counter_engine}]", counted=counted)
        assert counted == 5  # it was kept after all: "not recorded" would have been a lie
    finally:
        mc_relay.close()


class TakeThenCut:
    """A memcache client whose first ``cas`` of ``key`` goes out with the relay holding
    its reply (the real cache applies it; the client times out), after which the relay
    is cut: every later call of this client is refused, never sent."""

    def __init__(self, client: Any, relay: ReplyHoldingRelay, key: str) -> None:
        self._client, self._relay, self._key = client, relay, key

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if name != "cas" or self._relay.hold.is_set():
            return attribute

        def held(key: str, *args: Any, **kwargs: Any) -> Any:
            if key != self._key:
                return attribute(key, *args, **kwargs)
            self._relay.hold.set()
            try:
                return attribute(key, *args, **kwargs)
            finally:
                time.sleep(0.3)  # past memcache_timeout, and the cas has landed
                self._relay.cut()

        return held


@pytest.mark.one_cache_server
def test_a_write_whose_take_of_the_stash_lost_its_reply_loses_nothing(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    sharded_counter_cache: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """W3' on the real backends (found by the simulator, docs/protocol.md section 6).

    5 wait in delayed_incr (Datastore refused their write). A second process's write
    takes them for its fold: the cache applies the take, marking a fold under the
    write's token, but the reply is lost and the cache is gone for that process after
    (a relay holds the reply, then is cut), so it can neither fold nor put them back.
    Had it written its own 1 under that token, settling the marker would find the
    token on a shard and drop the 5 as landed. It writes under a new token; the
    marker, once past its deadline, puts the 5 back to be written."""
    fast = {"write_mode": "transaction", "retry_attempts": 1, "retry_deadline": 0.3}
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        refused = connected(Counter("take-reply-lost", rpc_timeout=0.3, **fast))
    refused.increment(5)  # stashed, acknowledged
    assert refused._pending_stash() == 5
    mc_relay = ReplyHoldingRelay(sharded_counter_cache.host, sharded_counter_cache.port)
    try:
        timeouts = {"memcache_timeout": 0.2, "memcache_connect_timeout": 0.2}
        url = cache_url_through(sharded_counter_cache, "127.0.0.1", mc_relay.port)
        client = build_client(Settings(cache_url=url, **timeouts))
        warm = f"warm-{uuid.uuid4().hex}"  # as above: Redis holds our scripts first
        assert client.add(warm, b"1") is True
        assert client.cas(warm, b"2", client.gets(warm)[1]) is True
        cut = TakeThenCut(client, mc_relay, refused._paths.ctx.stash_key)
        held = Counter("take-reply-lost", memcache_client=cut, rpc_timeout=1.0, **fast)
        assert held.get_count() == 5  # a read: this process has seen the stash
        held.increment(1)  # its take landed unheard; it writes 1 under a new token
    finally:
        mc_relay.close()
    healthy = Counter("take-reply-lost", rpc_timeout=0.3, **fast)
    folds = Stash.parse(sharded_counter_cache_get(healthy)).folds
    assert [fold.amount for fold in folds.values()] == [5]  # the take did land
    assert healthy.get_count(nocache=True) == 1  # the 5 are in flight (section 5)
    time.sleep(3.6)  # past the fold's deadline: retry_deadline + rpc_timeout + 2 s
    healthy.write_pending()
    total = healthy.get_count(nocache=True)
    report(f"take-reply-lost[{sharded_counter_engine}]", total=total)
    assert total == 6
    assert healthy._pending_stash() == 0


def sharded_counter_cache_get(counter: Counter) -> bytes:
    """The raw delayed_incr of ``counter``, read with a client of the test's cache."""
    client = build_client(resolve())
    raw: bytes = client.get(counter._paths.ctx.stash_key)
    client.close()
    return raw
