"""SharedBuffer: increments held in memcache for every process, flushed by any process.

Every test runs once per Datastore engine against the real emulator and real
memcached. Writer and flusher processes are real processes (spawned), killed
with SIGKILL where the test says so. Datastore writes are counted by wrapping
the store's commit in the process that makes them (instrumentation, not a fake:
the real commit runs).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import connected
from google.api_core import exceptions as gexc

from sharded_counter import (
    CacheUnavailable,
    Counter,
    CounterOverflowError,
    DatastoreUnavailable,
    SharedBuffer,
)
from sharded_counter.store.shards import ShardStore
from sharded_counter_emulator import free_port

pytestmark = pytest.mark.backends

NAMES = [f"page-{i}" for i in range(20)]


@contextlib.contextmanager
def counting_commits() -> Iterator[list[int]]:
    """Count the shard commits this process makes (each one a Datastore write)."""
    commits: list[int] = []
    original = ShardStore.commit

    def counted(store: ShardStore, *args: Any, **kwargs: Any) -> Any:
        commits.append(1)
        return original(store, *args, **kwargs)

    ShardStore.commit = counted  # type: ignore[method-assign]
    try:
        yield commits
    finally:
        ShardStore.commit = original  # type: ignore[method-assign]


def probe_first() -> None:
    """The first write of a process probes the engine with a scratch entity (three
    commits): done before any commit is counted."""
    assert Counter("probe").write_mode in ("transform", "transaction")


def test_increments_wait_in_memcache_and_a_flush_writes_each_counter_once(
    sharded_counter_env: dict[str, str],
) -> None:
    probe_first()
    buffer = SharedBuffer(interval=60)
    with counting_commits() as commits:
        for name in NAMES[:5]:
            for _ in range(10):
                buffer.increment(name, 2)
        buffer.increment(NAMES[0], -5)
        assert commits == []  # increments touch memcache only
    assert buffer.pending(NAMES[0]) == 15
    assert buffer.count(NAMES[0]) == 15  # reads count what is pending
    assert Counter(NAMES[0]).get_count(nocache=True) == 15  # any reader does
    with counting_commits() as commits:
        written = buffer.flush()
    assert sorted(written) == sorted(NAMES[:5])
    assert len(commits) == 5  # one shard write per counter
    assert [buffer.pending(n) for n in NAMES[:5]] == [0] * 5
    assert Counter(NAMES[0]).verify().shards == 15
    assert buffer.flush() == []  # nothing listed any more


def _writer(
    names: list[str], threads: int, index: int, ready: Any, freeze: Any, out: Any
) -> None:  # pragma: no cover - runs in a spawned process, killed by the test
    # A generous memcache timeout: on a loaded 2-core machine a 0.5 s call can time out,
    # and an increment whose reply was lost may or may not count (not what this tests).
    buffer = SharedBuffer(interval=60, memcache_timeout=5.0)
    buffer.pending(names[0])  # connected before the clock starts
    ready.release()
    acked = {name: 0 for name in names}
    errors: list[str] = []
    lock = threading.Lock()
    frozen = threading.Barrier(threads + 1, timeout=60)

    def write(t: int) -> None:
        k = 0
        try:
            while not freeze.is_set():
                name = names[(t + k) % len(names)]
                delta = 1 + (index * threads + t + k) % 7
                buffer.increment(name, delta)
                with lock:
                    acked[name] += delta
                k += 1
        except Exception as exc:  # reported, so the test fails with it rather than hangs
            with lock:
                errors.append(repr(exc))
        frozen.wait()  # every increment in flight has returned
        frozen.wait()  # and is reported: stay put until killed

    with counting_commits() as commits:
        workers = [threading.Thread(target=write, args=(t,), daemon=True) for t in range(threads)]
        for worker in workers:
            worker.start()
        frozen.wait()
        out.put((acked, len(commits), errors))
        frozen.wait()
        time.sleep(3600)


def _flusher(out: Any) -> None:  # pragma: no cover - runs in a spawned process
    probe_first()
    buffer = SharedBuffer(interval=60)
    with counting_commits() as commits:
        written = buffer.flush()
    out.put((written, len(commits)))


@pytest.mark.needs_processes
def test_writers_killed_midway_lose_nothing_a_third_process_flushes(
    sharded_counter_env: dict[str, str], sharded_counter_engine: str
) -> None:
    """2 processes x 8 threads add to 20 counters, then both are SIGKILLed (their
    increments in flight returned first); a flusher in a third process writes it all."""
    context = multiprocessing.get_context("spawn")
    ready, freeze, out = context.Semaphore(0), context.Event(), context.Queue()
    writers = [
        context.Process(target=_writer, args=(NAMES, 8, i, ready, freeze, out), daemon=True)
        for i in range(2)
    ]
    for writer in writers:
        writer.start()
    for _ in writers:
        assert ready.acquire(timeout=120), "a writer process did not start"
    time.sleep(3.0)  # both write meanwhile
    freeze.set()
    reports = [out.get(timeout=60) for _ in writers]
    for writer in writers:
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(10)
    acked = {name: sum(r[0][name] for r in reports) for name in NAMES}
    assert [e for r in reports for e in r[2]] == []
    assert sum(r[1] for r in reports) == 0, "a writer process wrote to Datastore"
    assert sum(acked.values()) > 0
    # A queue of its own: a writer SIGKILLed while its queue's feeder still held the
    # queue's write lock (it can, just after the report was read) leaves that lock
    # taken for good, and a flusher putting on the same queue would wait on it forever.
    flushed = context.Queue()
    flusher = context.Process(target=_flusher, args=(flushed,))
    flusher.start()
    written, commits = flushed.get(timeout=120)
    flusher.join(30)
    totals = {name: Counter(name).get_count(nocache=True) for name in NAMES}
    shards = {name: Counter(name).verify().shards for name in NAMES}
    print(
        f"\n[shared-buffer] killed-writers[{sharded_counter_engine}]: acknowledged="
        f"{sum(acked.values())} flushed={len(written)} commits={commits}"
    )
    assert totals == acked and shards == acked  # all of it in the shards, exactly
    assert commits <= len(NAMES)  # one write per counter


def _race_flush(ready: Any, start: Any, out: Any) -> None:  # pragma: no cover - spawned
    probe_first()
    buffer = SharedBuffer(interval=60)
    ready.release()
    start.wait(120)
    with counting_commits() as commits:
        written = buffer.flush()
    out.put((written, len(commits)))


@pytest.mark.needs_processes
def test_two_flushers_racing_write_each_amount_once(
    sharded_counter_env: dict[str, str], sharded_counter_engine: str
) -> None:
    buffer = SharedBuffer(interval=60)
    expected = {}
    for i, name in enumerate(NAMES):
        for _ in range(5):
            buffer.increment(name, i + 1)
        expected[name] = 5 * (i + 1)
    context = multiprocessing.get_context("spawn")
    ready, start, out = context.Semaphore(0), context.Event(), context.Queue()
    flushers = [context.Process(target=_race_flush, args=(ready, start, out)) for _ in range(2)]
    for flusher in flushers:
        flusher.start()
    for _ in flushers:
        assert ready.acquire(timeout=120), "a flusher process did not start"
    start.set()  # both go at once
    results = [out.get(timeout=120) for _ in flushers]
    for flusher in flushers:
        flusher.join(30)
    totals = {name: Counter(name).verify().shards for name in NAMES}
    written = [name for names, _ in results for name in names]
    print(
        f"\n[shared-buffer] racing-flushers[{sharded_counter_engine}]: written by each "
        f"{[len(n) for n, _ in results]}, commits {[c for _, c in results]}"
    )
    assert totals == expected
    assert sorted(written) == sorted(NAMES)  # each counter written by exactly one of them
    assert sum(c for _, c in results) <= len(NAMES)


def _held_flusher(name: str, held: Any) -> None:  # pragma: no cover - spawned, killed
    """A flusher that takes the pending amount and is held before its shard write."""

    def hold(*args: Any, **kwargs: Any) -> Any:
        held.set()
        time.sleep(3600)  # killed here

    ShardStore.add_in_transaction = hold  # type: ignore[method-assign]
    ShardStore.add_with_transform = hold  # type: ignore[method-assign]
    SharedBuffer(interval=60, retry_deadline=1.0, rpc_timeout=0.5).flush(name)


@pytest.mark.parametrize("fate", ["before-write", "after-write"])
@pytest.mark.needs_processes
def test_a_flusher_killed_mid_flush_loses_nothing_and_counts_nothing_twice(
    sharded_counter_env: dict[str, str], sharded_counter_engine: str, fate: str
) -> None:
    """The flusher takes the amount (its fold marker on the stash) and is SIGKILLed,
    before its shard write, or after it landed but before it settled. A flusher
    started again after the fold's deadline resolves it by the write's token."""
    name = f"killed-flusher-{fate}"
    # The killed flusher runs with short time limits (so its fold's marker expires
    # soon); the one started again keeps the defaults, so its resolution, an
    # all-shard transaction that every write may abort, gets its usual time.
    buffer = SharedBuffer(interval=60)
    buffer.increment(name, 1000)
    context = multiprocessing.get_context("spawn")
    held = context.Event()
    if fate == "before-write":
        flusher = context.Process(target=_held_flusher, args=(name, held), daemon=True)
    else:
        flusher = context.Process(target=_flusher_dies_after_write, args=(name, held), daemon=True)
    flusher.start()
    assert held.wait(60), "setup: the flusher did not reach its shard write"
    os.kill(flusher.pid, signal.SIGKILL)
    flusher.join(10)
    assert buffer.pending(name) == 0  # taken: it sits on the fold's marker now
    buffer.increment(name, 5)  # more arrives meanwhile
    # Past the fold's deadline (1.0 + 0.5 + 2 s) and the flush lock's ttl (4 s, which
    # memcached may end up to a second early or late).
    time.sleep(5.0)
    # A flusher again: the dead one's fold part is resolved by its token, then the 5.
    assert buffer.flush(name) == [name]
    assert (Counter(name).verify().shards, buffer.pending(name)) == (1005, 0)


def _flusher_dies_after_write(name: str, held: Any) -> None:  # pragma: no cover - spawned
    """A flusher whose shard write lands, then it is held before settling its fold."""
    from sharded_counter.paths.writes import PlainWrites

    original = PlainWrites._settle_fold

    def hold_after_landing(self: Any, token: str, folded: int, fold: Any) -> None:
        if folded:
            held.set()
            time.sleep(3600)
        original(self, token, folded, fold)

    PlainWrites._settle_fold = hold_after_landing  # type: ignore[method-assign]
    SharedBuffer(interval=60, retry_deadline=1.0, rpc_timeout=0.5).flush(name)


def test_at_most_one_datastore_write_per_counter_per_interval(
    sharded_counter_env: dict[str, str], sharded_counter_engine: str
) -> None:
    """A flusher thread at a 0.5 s interval while 8 threads keep adding to 5 counters for
    2.6 s: the shard writes stay within one per counter per flush round."""
    names = NAMES[:5]
    probe_first()
    with counting_commits() as commits:
        buffer = SharedBuffer(interval=0.5, flusher=True)
        stop = threading.Event()
        acked = [0]
        lock = threading.Lock()

        def write(t: int) -> None:
            k = 0
            while not stop.is_set():
                buffer.increment(names[(t + k) % len(names)], 1)
                with lock:
                    acked[0] += 1
                k += 1

        workers = [threading.Thread(target=write, args=(t,)) for t in range(8)]
        began = time.monotonic()
        for worker in workers:
            worker.start()
        time.sleep(2.6)
        stop.set()
        for worker in workers:
            worker.join(10)
        buffer.stop()  # its last round writes what is left
        elapsed = time.monotonic() - began
    rounds = int(elapsed / 0.5) + 2  # the rounds of the interval, and the final flush
    total = sum(Counter(n).verify().shards for n in names)
    print(
        f"\n[shared-buffer] writes-per-interval[{sharded_counter_engine}]: increments={acked[0]} "
        f"commits={len(commits)} rounds<={rounds} keys={len(names)}"
    )
    assert total == acked[0]
    assert len(commits) <= len(names) * rounds


def test_memcache_down_raises_or_writes_directly_as_the_caller_chose(
    sharded_counter_env: dict[str, str],
) -> None:
    dead = {"memcached_hosts": [f"127.0.0.1:{free_port()}"], "memcache_timeout": 0.2}
    with pytest.raises(CacheUnavailable):
        SharedBuffer(**dead).increment("no-cache", 3)
    SharedBuffer(on_cache_failure="direct", **dead).increment("no-cache", 4)
    assert Counter("no-cache", memcached_hosts=()).get_count(nocache=True) == 4


@pytest.mark.needs_processes
def test_datastore_down_at_flush_keeps_the_amount_pending(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    SharedBuffer(interval=60).increment("flaky", 9)
    with monkeypatch.context() as patch:
        # Nothing listens there: every write is refused, certainly not applied.
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        broken = connected(SharedBuffer(
            interval=60, write_mode="transaction", retry_attempts=1, retry_deadline=0.3,
            rpc_timeout=0.3,
        ))  # fmt: skip
        with pytest.raises(DatastoreUnavailable) as failed:
            broken.flush()
        assert isinstance(failed.value.__cause__, gexc.ServiceUnavailable)
    buffer = SharedBuffer(interval=60)
    assert buffer.pending("flaky") == 9  # put back, and listed again for the next round
    assert buffer.flush() == ["flaky"]
    assert (Counter("flaky").verify().shards, buffer.pending("flaky")) == (9, 0)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda b: b.increment("x", 1.5), TypeError),
        (lambda b: b.increment("x", True), TypeError),
        (lambda b: b.increment("x", 2**63), ValueError),
        (lambda b: b.increment("", 1), ValueError),
        (lambda b: b.increment(b"x", 1), TypeError),
        (lambda b: b.flush(""), ValueError),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(
    sharded_counter_env: dict[str, str], call: Any, error: type[Exception]
) -> None:
    buffer = SharedBuffer(interval=60)
    with pytest.raises(error):
        call(buffer)
    assert buffer.flush() == []


def test_any_unicode_name_and_the_whole_int64_range(sharded_counter_env: dict[str, str]) -> None:
    """Pending amounts are signed and as wide as a shard; names are any unicode. An
    increment that would take the pending amount out of int64 is refused whole."""
    top = 2**63 - 1
    names = ["página/日本語 ✓", "emoji 🧮 counter", "x" * 400]
    buffer = SharedBuffer(interval=60)
    for name in names:
        buffer.increment(name, top)
        assert buffer.pending(name) == top
    assert sorted(buffer.flush()) == sorted(names)
    for name in names:
        buffer.increment(name, -top)
        with pytest.raises(CounterOverflowError):
            buffer.increment(name, -top)  # -(2**64 - 2) pending: no write could carry it
        buffer.increment(name, -1)  # -(2**63) pending: the least int64
        assert buffer.pending(name) == -(2**63)
        assert buffer.count(name) == -1
    assert sorted(buffer.flush()) == sorted(names)
    assert [Counter(n).verify().shards for n in names] == [-1] * 3
    assert [buffer.pending(n) for n in names] == [0] * 3


def test_bad_settings_are_refused() -> None:
    for bad in (0, -1, float("inf")):
        with pytest.raises(ValueError):
            SharedBuffer(interval=bad)
    with pytest.raises(TypeError):
        SharedBuffer(interval=True)
    with pytest.raises(ValueError, match="on_cache_failure"):
        SharedBuffer(on_cache_failure="ignore")


def test_the_docs_example_runs(sharded_counter_env: dict[str, str]) -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "using.md").read_text(encoding="utf-8")
    section = page.split("## A buffer shared by every process", 1)[1].split("\n#", 1)[0]
    source = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(source, "docs/using.md", "exec"), namespace)
    namespace["flusher"].stop()
    assert namespace["views"].pending("page:home") == 0  # flushed
    assert Counter("page:home").verify().shards == 1
