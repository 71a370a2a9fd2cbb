"""What the bench races: each contender, made ready for one measurement.

Every contender is opened on a fresh name per measurement and knows how to
check itself afterwards: the increments the writers were told succeeded
must equal what the backend says, uncached and (where there is a cache)
cached. Blind puts are the ceiling: one non-transactional commit of a new
entity, the least a write can cost, so every other rate is read against it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Callable
from typing import Any

from google.cloud import datastore

from ...bounded import BoundedCounter
from ...counter import Counter
from ...patterns.buffer import CounterBuffer
from ...patterns.shared_buffer import SharedBuffer

BLIND_KIND = "BenchBlind"
SHARDS = 20  # the shard count of the default Counter, the buffer and the transform path
BUFFER_INTERVAL = 0.5
# More than the most writer threads the bench runs: every increment is a write of
# its own, so the write paths themselves are measured, without group commit.
ONE_WRITE_EACH: dict[str, Any] = {"max_concurrent_writes": 64, "group_commit": False}


def _fixed(shards: int) -> dict[str, Any]:
    """A contender measured at exactly ``shards`` shards: adaptive sharding off."""
    return {"shards": shards, "max_shards": shards}


@dataclasses.dataclass(frozen=True)
class Check:
    """The count read back after a measurement, against the acknowledged increments."""

    expected: int
    uncached: int
    cached: int | None  # None: this contender has no cache

    @property
    def exact(self) -> bool:
        return self.uncached == self.expected and self.cached in (None, self.expected)


def _no_op() -> None:
    return None


@dataclasses.dataclass
class Target:
    """One contender opened on one name: what writers call, what to count, how to check."""

    increment: Callable[[], None]
    write_mode: str
    check: Callable[[int], Check]
    rpc_slots: list[tuple[object, str]]  # (object, attribute) holding a GAPIC client
    cache_slots: list[tuple[object, str]]  # (object, attribute) holding a memcache client
    aborts: Callable[[], int] | None = None  # contention aborts so far, where known
    settle: Callable[[], None] = _no_op  # inside the timed span, after the writers stop
    shards_in_use: Callable[[], int] | None = None  # adaptive sharding's count, at the end


Opener = Callable[[str, float], Target]  # (name, seconds per measurement) -> Target


@dataclasses.dataclass(frozen=True)
class Contender:
    key: str
    label: str
    open: Opener
    engines: tuple[str, ...] = ("classic", "firestore")
    unsupported: str = ""  # why it is "n/a" on the other engines
    processes: bool = False  # also measured with several processes
    threads: bool = True  # measured from threads of one process (False: processes only)
    batch: int = 1  # increments between two looks at the clock (fast contenders)
    # The cache kinds it is measured with: every contender on memcached; on Redis the
    # ones issue 28's targets name, and the blind puts they are read against.
    caches: tuple[str, ...] = ("memcached",)

    def runs_on(self, engine: str, cache: str = "memcached") -> bool:
        return engine in self.engines and cache in self.caches


def _bounded(seconds: float) -> dict[str, Any]:
    # A writer still retrying at the deadline holds the measurement back: bound it,
    # as the demo does. A write that gives up is stashed (or refused) and checked.
    return {"retry_deadline": max(1.0, seconds)}


def _counter_target(name: str, seconds: float, *, read: bool = True, **options: Any) -> Target:
    counter = Counter(name, **_bounded(seconds), **options)
    mode = counter.write_mode  # the first call may probe the backend: not in the timed span
    cache = counter._backend.cache
    if cache.enabled and read:
        # A counter somebody reads has its total cached, and then every write merges
        # into that record: the steady state of a hot, displayed counter.
        counter.get_count()

    def check(expected: int) -> Check:
        uncached = counter.get_count(nocache=True)
        return Check(expected, uncached, counter.count if cache.enabled else None)

    return Target(
        increment=counter.increment,
        write_mode=mode,
        check=check,
        rpc_slots=[(counter._backend.store, "rpc")],
        cache_slots=[(cache, "_client")],
        aborts=lambda: counter.stats.snapshot()["aborts"],
        shards_in_use=lambda: counter.shards_in_use,
    )


# Far from its bound: a maximum no run comes near, so no shard's share runs dry.
FAR_MAXIMUM = 10**12


def _bounded_target(name: str, seconds: float) -> Target:
    """The default Counter's shape, bounded far from its maximum: what escrow costs
    (a transaction that reads the shard's share) when it never has to borrow."""
    counter = BoundedCounter(name, maximum=FAR_MAXIMUM, shards=SHARDS, **_bounded(seconds))
    # Laid out before the clock starts, once: the bench opens a multi-process point in
    # its own process first, and 4 writer processes each setting it again at once
    # met each other's locks on the Firestore engine until a set gave up.
    if counter.bounds_in_datastore() is None:
        counter.count = 0
    counter.get_count()  # and its total cached
    cache = counter._backend.cache

    def check(expected: int) -> Check:
        uncached = counter.get_count(nocache=True)
        return Check(expected, uncached, counter.count if cache.enabled else None)

    return Target(
        increment=counter.increment,
        write_mode=f"bounded, {counter.write_mode}",
        check=check,
        rpc_slots=[(counter._backend.store, "rpc")],
        cache_slots=[(cache, "_client")],
        aborts=lambda: counter.stats.snapshot()["aborts"],
    )


def _keyed_target(name: str, seconds: float) -> Target:
    """The default Counter, every increment with an idempotency key of its own (as a
    task queue's message ids are): what exactly-once costs over a plain increment."""
    target = _counter_target(name, seconds, shards=SHARDS)
    counter_increment = target.increment
    ids = itertools.count()  # next() on a count is atomic in CPython: keys never repeat
    prefix = f"{os.getpid()}-"

    def keyed() -> None:
        counter_increment(1, idempotency_key=f"{prefix}{next(ids)}")  # type: ignore[call-arg]

    target.increment = keyed
    target.write_mode = f"{target.write_mode}, keyed"
    return target


def _buffer_target(name: str, seconds: float) -> Target:
    # Made with the buffer's options, this Counter shares the Backend the buffer's
    # flushes use, so its store and cache are where those round trips show.
    target = _counter_target(name, seconds, shards=SHARDS)
    buffer = CounterBuffer(interval=BUFFER_INTERVAL, shards=SHARDS, **_bounded(seconds))
    target.increment = functools.partial(buffer.increment, name)
    target.settle = buffer.stop  # flushes what is pending, then lets its thread end
    target.write_mode = f"buffer {BUFFER_INTERVAL:g} s, {target.write_mode}"
    target.aborts = None  # the flushes' own Counters keep those
    return target


def _shared_buffer_target(name: str, seconds: float) -> Target:
    # The Counter made with the same options shares the Backend the buffer uses, so
    # its memcache calls (the stash, the list of pending names) show on its slot.
    target = _counter_target(name, seconds, shards=SHARDS)
    buffer = SharedBuffer(interval=BUFFER_INTERVAL, shards=SHARDS, **_bounded(seconds))
    target.increment = functools.partial(buffer.increment, name)

    def settle() -> None:
        buffer.flush(name)  # what is pending goes to a shard, in one write

    target.settle = settle
    target.write_mode = f"shared buffer {BUFFER_INTERVAL:g} s, {target.write_mode}"
    target.aborts = None
    return target


def _blind_target(name: str, seconds: float) -> Target:
    # The high-level client is untyped; Any keeps that to this one function.
    client: Any = datastore.Client()  # type: ignore[no-untyped-call]
    client.get(client.key(BLIND_KIND, "warm-up"))  # opens the channel outside the timed span
    ids = itertools.count()
    prefix = f"{name}:{os.getpid()}:"  # unique across the processes of one run too

    def put() -> None:
        entity = datastore.Entity(client.key(BLIND_KIND, f"{prefix}{next(ids)}"))  # type: ignore[no-untyped-call]
        # Indexed, like a shard's name: the query below finds this run's entities by it.
        entity["run"] = name
        client.put(entity)

    def check(expected: int) -> Check:
        query = client.query(kind=BLIND_KIND)
        run_filter = datastore.query.PropertyFilter("run", "=", name)  # type: ignore[no-untyped-call]
        query.add_filter(filter=run_filter)
        query.keys_only()
        return Check(expected, sum(1 for _ in query.fetch()), None)

    return Target(
        increment=put,
        write_mode="non-transactional put",
        check=check,
        rpc_slots=[(client, "_datastore_api_internal")],
        cache_slots=[],
    )


def _counter(**options: Any) -> Opener:
    return functools.partial(_counter_target, **options)


BOTH = ("memcached", "redis")
_TRANSFORM_NOTE = "the classic emulator ignores transforms and overwrites: not run"

CONTENDERS: tuple[Contender, ...] = (
    Contender("blind", "blind puts (ceiling)", _blind_target, processes=True, caches=BOTH),
    Contender(
        "naive",
        "one entity, transaction, no cache",
        _counter(**_fixed(1), write_mode="transaction", memcached_hosts=(), **ONE_WRITE_EACH),
    ),
    *(
        Contender(
            f"txn-{n}",
            f"transaction, {n} shard{'s' if n > 1 else ''}",
            _counter(**_fixed(n), write_mode="transaction", **ONE_WRITE_EACH),
        )
        for n in (1, 5, 20, 50)
    ),
    Contender(
        "transform-20",
        f"transform, {SHARDS} shards",
        _counter(**_fixed(SHARDS), write_mode="transform", **ONE_WRITE_EACH),
        engines=("firestore",),
        unsupported=_TRANSFORM_NOTE,
    ),
    Contender(
        "counter",
        f"sharded Counter ({SHARDS}, auto)",
        _counter(shards=SHARDS),
        processes=True,
        caches=BOTH,
    ),
    # Issue 17: a counter made with the default shard count, which adaptive sharding
    # grows under contention, measured from a cold start at the process layouts.
    Contender(
        "counter-default",
        "sharded Counter (default shards, adaptive)",
        _counter(),
        processes=True,
        threads=False,
    ),
    # The same Counter with group commit out of the way: what one write per
    # increment costs on the best path for the engine.
    Contender(
        "counter-keyed",
        f"sharded Counter ({SHARDS}), idempotency keys",
        _keyed_target,
        processes=True,
        caches=BOTH,
    ),
    Contender(
        "bounded",
        f"BoundedCounter ({SHARDS}), far from its bound",
        _bounded_target,
        processes=True,
    ),
    Contender(
        "counter-solo",
        f"sharded Counter ({SHARDS}), no group commit",
        _counter(**_fixed(SHARDS), **ONE_WRITE_EACH),
    ),
    # Not one of the ways to count: the same Counter while nobody reads it, so no
    # total is cached and a write's merge is one memcache call. Next to the line
    # above, it shows what keeping a cached total up to date costs the writers.
    Contender(
        "counter-unread",
        f"sharded Counter ({SHARDS}), total not cached",
        _counter(shards=SHARDS, read=False),
    ),
    Contender(
        "buffer",
        f"CounterBuffer ({BUFFER_INTERVAL:g} s)",
        _buffer_target,
        batch=200,
        processes=True,
    ),
    Contender(
        "shared-buffer",
        f"SharedBuffer ({BUFFER_INTERVAL:g} s)",
        _shared_buffer_target,
        processes=True,
        caches=BOTH,
    ),
)

BY_KEY = {c.key: c for c in CONTENDERS}
