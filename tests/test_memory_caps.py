"""Memory stays bounded in a long-lived process: many distinct counters, long outages.

The real backends throughout: a memcached of the test's own (stopped for the
outage, so that every call is refused, and started again on the same port) and
the Datastore emulator of each engine. Each structure a process keeps per
counter or per failed call is checked against its cap (docs/limits.md,
"Memory"), in entries and in approximate bytes.

Run with ``-s`` to see the measured numbers (lines starting ``[memory]``).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymemcache.client.base import Client

from sharded_counter import Counter
from sharded_counter.cache.backlog import SUSPECTS_CAP, UNSETTLED_CAP
from sharded_counter.cache.memcached.keydump import dump_keys
from sharded_counter.cache.sightings import SIGHTINGS_CAP, StashSightings
from sharded_counter.core.keys import cache_keys
from sharded_counter.core.record import (
    DECODE_CACHE_ENTRIES,
    DECODE_CACHE_MAX_VALUE,
    Record,
    _decode_cached,
)
from sharded_counter.core.stash import Stash, Unsure
from sharded_counter_emulator import Memcached

pytestmark = pytest.mark.backends

NAMES = 100_000
OUTAGE_WRITES = 10_000
WRITERS = 8
#: Datastore time limits with room for a loaded machine: the emulators slow down with
#: 100,000 counters' worth of work (a read timed out at the default 5 s on Firestore).
SLACK = {"rpc_timeout": 30.0, "retry_deadline": 90.0}

#: The byte caps docs/limits.md states, each from a run of this file (with room to spare).
SIGHTINGS_BYTES = 6 << 20  # the three kinds of sighting together
BACKLOG_BYTES = 4 << 20  # suspects and stash changes together
DECODE_CACHE_BYTES = 12 << 20


def report(test: str, **numbers: Any) -> None:
    print(f"[memory] {test}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


def approx_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """``sys.getsizeof`` of ``obj`` and everything it holds (containers, closures'
    cells, dataclass fields), each object once."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        parts: list[Any] = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
        parts = list(obj)
    elif callable(obj) and getattr(obj, "__closure__", None):
        parts = [cell.cell_contents for cell in obj.__closure__]
    elif hasattr(obj, "__dataclass_fields__"):
        parts = [getattr(obj, field) for field in obj.__dataclass_fields__]
    else:
        parts = []
    return size + sum(approx_bytes(part, seen) for part in parts)


@pytest.fixture
def own_memcached() -> Iterator[Memcached]:
    server = Memcached(memory_mb=256).start()
    try:
        yield server
    finally:
        server.stop()


def fill(server: Memcached, items: Iterator[tuple[str, bytes]], batch: int = 2_000) -> int:
    """set_many ``items`` in batches; how many bytes were stored."""
    client = Client((server.host, server.port), timeout=10)
    stored = 0
    try:
        chunk: dict[str, bytes] = {}
        for key, value in items:
            chunk[key] = value
            stored += len(value)
            if len(chunk) >= batch:
                assert client.set_many(chunk, noreply=False) == []
                chunk = {}
        if chunk:
            assert client.set_many(chunk, noreply=False) == []
    finally:
        client.close()
    return stored


def in_threads(body: Callable[[int], None], items: int, threads: int = WRITERS) -> None:
    errors: list[BaseException] = []

    def run(start: int) -> None:
        try:
            for i in range(start, items, threads):
                body(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == [], errors[:3]


def test_caps_hold_with_100000_counters_and_a_10000_write_memcache_outage(
    sharded_counter_env: dict[str, str],
    sharded_counter_engine: str,
    own_memcached: Memcached,
) -> None:
    hosts = own_memcached.address
    probe = Counter("memory-probe", memcached_hosts=hosts, **SLACK)
    probe.increment(1)  # connects, and the engine's write-mode probe, before the clock
    cache = probe._backend.cache.steps
    scope = probe._backend.store.scope
    prefix = probe.settings.key_prefix
    names = [f"many-{i}" for i in range(NAMES)]

    # 100,000 counters, each with a complete cached total and an amount pending in
    # delayed_incr, read through the public API (no Datastore read: all cached).
    def cached(name_index: int) -> Iterator[tuple[str, bytes]]:
        record_key, stash_key = cache_keys(prefix, scope, names[name_index])
        record = Record("0123456789ab", True, {"i0": (1, name_index)})  # a well-formed epoch
        yield record_key, record.encode()
        yield stash_key, Stash(pending=1).encode()

    fill(own_memcached, (item for i in range(NAMES) for item in cached(i)))
    started = time.monotonic()
    for at in range(0, NAMES, 5_000):
        chunk = names[at : at + 5_000]
        totals = Counter.get_counts(chunk, memcached_hosts=hosts, **SLACK)
        assert totals == {name: at + i + 1 for i, name in enumerate(chunk)}
    read_s = time.monotonic() - started
    sightings = cache.sightings.sizes()
    assert sightings["pending"] == SIGHTINGS_CAP  # reached: the cap was exercised
    assert all(size <= SIGHTINGS_CAP for size in sightings.values()), sightings
    assert _decode_cached.cache_info().currsize <= DECODE_CACHE_ENTRIES

    # The outage: memcached stopped, 10,000 writes to counters this process saw
    # pending (each take of the stash, and each merge of the total, refused).
    own_memcached.stop()
    written = names[-OUTAGE_WRITES:]
    started = time.monotonic()
    in_threads(
        lambda i: Counter(written[i], memcached_hosts=hosts, **SLACK).increment(1), OUTAGE_WRITES
    )
    outage_s = time.monotonic() - started
    backlog = cache.backlog.sizes()
    assert backlog["suspects"] == SUSPECTS_CAP, backlog  # reached, not passed
    assert backlog["unsettled"] <= UNSETTLED_CAP, backlog
    assert cache.backlog.forgotten > 0
    sightings_bytes = approx_bytes(
        (cache.sightings._pending, cache.sightings._unsure, cache.sightings._setters)
    )
    backlog_bytes = approx_bytes((cache.backlog._suspects, cache.backlog._unsettled))
    report(
        f"caps[{sharded_counter_engine}]",
        names=NAMES,
        read_s=f"{read_s:.1f}",
        outage_writes=OUTAGE_WRITES,
        outage_s=f"{outage_s:.1f}",
        sightings=sightings,
        sightings_bytes=sightings_bytes,
        backlog=backlog,
        forgotten=cache.backlog.forgotten,
        backlog_bytes=backlog_bytes,
    )
    assert sightings_bytes <= SIGHTINGS_BYTES
    assert backlog_bytes <= BACKLOG_BYTES

    # memcached back (empty, as after any restart): the next call catches up, and
    # every write of the outage is in the shards.
    own_memcached.start()
    assert Counter(written[0], memcached_hosts=hosts, **SLACK).count == 1
    assert cache.backlog.sizes() == {"suspects": 0, "unsettled": 0}
    sample = written[:: OUTAGE_WRITES // 20]  # summed from the shards
    assert Counter.get_counts(
        sample, nocache=True, memcached_hosts=hosts, **SLACK
    ) == dict.fromkeys(sample, 1)


def test_every_kind_of_stash_sighting_stays_under_its_cap() -> None:
    """The one test here that calls the structure directly: the read path above notes
    pending amounts only, since a read that sees an unsure write resolves it in
    Datastore, and writers wait for a running set (100,000 of each would take hours)."""
    sightings = StashSightings()
    deadline = float(int(time.time()) + 600)  # whole seconds: the encoding keeps them exact
    unsure = Stash(pending=1, unsure={"w1": Unsure(amount=1, shard=0)}).encode()
    setting = Stash(setter=("set1", deadline)).encode()
    keys = [cache_keys("sharded_counter", "scope", f"many-{i}")[1] for i in range(2 * NAMES)]
    for i in range(NAMES):  # stash keys as long as real ones
        sightings.note(keys[i], unsure)
        sightings.note(keys[NAMES + i], setting)
    sizes = sightings.sizes()
    held = approx_bytes((sightings._pending, sightings._unsure, sightings._setters))
    report("sightings", noted=2 * NAMES, sizes=sizes, bytes=held)
    assert sizes == {"pending": SIGHTINGS_CAP, "unsure": SIGHTINGS_CAP, "setters": SIGHTINGS_CAP}
    assert sightings.pending_seen(keys[NAMES - 1]) and not sightings.pending_seen(keys[0])
    assert sightings.setter_seen(keys[-1]) == ("set1", deadline)
    assert held <= SIGHTINGS_BYTES


@contextlib.contextmanager
def traced() -> Iterator[Callable[[], tuple[int, int]]]:
    """(bytes held now, peak) since the block began, by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    try:
        yield lambda: tuple(x - base for x in tracemalloc.get_traced_memory())  # type: ignore[return-value]
    finally:
        tracemalloc.stop()


def test_the_record_decode_cache_keeps_no_large_value_and_at_most_its_entries() -> None:
    _decode_cached.cache_clear()
    with traced() as held:
        for i in range(200):  # 200 distinct 1 MiB values that are no record
            assert Record.decode(bytes([65 + i % 26]) * (1 << 20) + str(i).encode()) is None
        garbage_held, _ = held()
    # A record of 40 shards, the largest version and value each, is small enough
    # to be cached.
    widest = Record("e" * 12, True, {f"i{s}": (2**63 - 1, -(2**63)) for s in range(40)})
    assert len(widest.encode()) <= DECODE_CACHE_MAX_VALUE
    with traced() as held:
        for i in range(3 * DECODE_CACHE_ENTRIES):  # distinct records as wide as that one
            shards = {f"i{s}": (2**63 - 1 - i, -(2**63) + s) for s in range(40)}
            assert Record.decode(Record("e" * 12, True, shards).encode()) is not None
        full_held, _ = held()
    report(
        "decode-cache",
        garbage_held=garbage_held,
        widest_record=len(widest.encode()),
        entries=_decode_cached.cache_info().currsize,
        full_held=full_held,
    )
    assert garbage_held < 1 << 20  # not one of the 1 MiB values was kept
    assert _decode_cached.cache_info().currsize == DECODE_CACHE_ENTRIES
    assert full_held <= DECODE_CACHE_BYTES


def hash_table_settled(server: Memcached) -> bool:
    """Is memcached done growing its hash table? A crawl during the growth misses
    some keys (seen: 6 to 44 of 100,000), which is memcached's doing, not the dump's."""
    client = Client((server.host, server.port), timeout=10)
    try:
        stats = client.stats()
    finally:
        client.close()
    buckets = 2 ** int(stats[b"hash_power_level"])
    return not stats[b"hash_is_expanding"] and int(stats[b"curr_items"]) <= 1.5 * buckets


def test_a_key_dump_is_streamed_not_read_whole(own_memcached: Memcached) -> None:
    keys = (f"dump:{i:06d}:" + "x" * 180 for i in range(NAMES))
    fill(own_memcached, ((key, b"1") for key in keys))
    line = (
        "key=dump:000000:"
        + "x" * 180
        + " exp=-1 la=1700000000 cas=100000 fetch=no cls=5 size=300\n"
    )
    deadline = time.monotonic() + 60
    while not hash_table_settled(own_memcached):
        assert time.monotonic() < deadline, "memcached kept growing its hash table"
        time.sleep(0.05)
    with traced() as held:
        dumped = dump_keys((own_memcached.host, own_memcached.port), timeout=10.0)
        count = strays = 0
        for key in dumped:  # look at each key, keep none
            count += 1
            strays += not key.startswith("dump:")
        _, peak = held()
    dump_bytes = NAMES * len(line)
    report("keydump", keys=count, approx_dump_bytes=dump_bytes, peak_bytes=peak)
    assert (count, strays) == (NAMES, 0)
    assert peak < 1 << 20  # the dump is over 25 MB


def test_a_shared_buffer_keeps_at_most_its_cap_of_counters(
    sharded_counter_env: dict[str, str],
) -> None:
    from sharded_counter import SharedBuffer
    from sharded_counter.patterns.shared_buffer import MAX_COUNTERS

    buffer = SharedBuffer(interval=60)
    names = [f"buffered-{i}" for i in range(MAX_COUNTERS + 2_000)]
    for name in names:
        buffer.increment(name)
    kept = (len(buffer._counters), len(buffer._listed_at))
    report("shared-buffer", names=len(names), kept=kept, bytes=approx_bytes(buffer._listed_at))
    assert kept == (MAX_COUNTERS, MAX_COUNTERS)
    assert names[0] not in buffer._counters and names[-1] in buffer._counters  # oldest gone
    assert buffer.pending(names[0]) == 1  # a forgotten Counter object is made anew
    assert buffer._names.peek() >= {names[0], names[-1]}  # and every name stays listed
