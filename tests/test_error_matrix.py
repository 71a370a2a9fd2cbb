"""The error contract as a matrix: every public call of the API against every backend fault.

Rows are the public methods, properties and functions of ``sharded_counter.__all__``
and ``sharded_counter.aio.__all__`` that do I/O (``CELLS``); columns are the faults
(``FAULTS``), all made with real processes:

* **Datastore refusing**: the call's objects are made with ``DATASTORE_EMULATOR_HOST``
  naming a loopback port where nothing listens (a caller's transaction, begun before,
  reaches the emulator through a relay of the cell's own, which is cut).
* **Datastore stalled**: the session's emulator, its JVM ``SIGSTOP``ped for the call.
* **memcache refusing**: a memcached of the test's own, ``SIGKILL``ed for the call.
* **memcache stalled**: that memcached ``SIGSTOP``ped for the call.
* **both down**: Datastore refusing and memcached killed.

Each cell prepares its data with healthy backends and default time limits, makes the
objects it calls with short ones (``SHORT_DATASTORE`` / ``SHORT_MEMCACHE``), breaks the
backend, makes the one call, and heals the backend. The call must end as ``EXPECTED``
says (returned, and how, or which of our errors it raised: never a raw ``google``,
``grpc``, ``pymemcache`` or ``socket`` error), within its budget (``budget``) plus
``SLACK`` seconds. ``docs/errors.md`` shows ``EXPECTED`` as a table, and
``test_the_docs_show_the_matrix`` keeps the two equal.

Datastore faults run on both engines for calls that reach Datastore: the engines take
different write paths (increment transforms on Firestore, transactions on the classic
emulator), so each can fail differently. Memcache faults, and calls that never reach
Datastore, run on one engine (the first of ``--sc-engines``): the memcache client, the
cache tier and both shells are the same code on either engine.

Run with ``-s`` to see every cell's outcome and time (lines starting ``[matrix]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import ReplyHoldingRelay

import sharded_counter
import sharded_counter.aio
from sharded_counter import (
    BoundedCounter,
    Counter,
    CounterBuffer,
    Lease,
    RateLimiter,
    ShardedCounterError,
    SharedBuffer,
    TimeSeries,
    config,
    lock,
    purge_expired_keys,
    who_holds,
)
from sharded_counter.aio import AsyncCounter, AsyncRateLimiter, aclose, alock, drain
from sharded_counter_emulator import BackendStack, Memcached, datastore_client, free_port

pytestmark = pytest.mark.backends

# -- the faults -----------------------------------------------------------------------------

DS_REFUSING = "Datastore refusing"
DS_STALLED = "Datastore stalled"
MC_REFUSING = "memcache refusing"
MC_STALLED = "memcache stalled"
BOTH_DOWN = "both down"
FAULTS = (DS_REFUSING, DS_STALLED, MC_REFUSING, MC_STALLED, BOTH_DOWN)
DATASTORE_FAULTS = (DS_REFUSING, DS_STALLED, BOTH_DOWN)
MEMCACHE_FAULTS = (MC_REFUSING, MC_STALLED)

# Time limits of the objects a cell calls. The backend at fault gets short ones, so a
# cell takes a second or so; the healthy one keeps the defaults, so that a slow answer
# on a loaded machine is not mistaken for the fault.
SHORT_DATASTORE = {
    "rpc_timeout": 0.3,
    "retry_deadline": 0.6,
    "retry_attempts": 3,
    "retry_max_wait": 0.1,
}
SHORT_MEMCACHE = {"memcache_timeout": 0.25, "memcache_connect_timeout": 0.25}
HEALTHY_MEMCACHE = {"memcache_timeout": 3.0, "memcache_connect_timeout": 3.0}
#: A cell's preparation, with both backends up: Datastore's default limits, and memcache
#: ones so wide that a loaded machine cannot make it miss the cached total it fills.
PREPARING = {"memcache_timeout": 5.0, "memcache_connect_timeout": 5.0}


def short_limits(fault: str) -> dict[str, Any]:
    """The settings (``config['sharded_counter']``) of the objects a cell calls."""
    datastore_limits = SHORT_DATASTORE if fault in DATASTORE_FAULTS else {}
    memcache_limits = SHORT_MEMCACHE if fault in (*MEMCACHE_FAULTS, BOTH_DOWN) else HEALTHY_MEMCACHE
    return {**datastore_limits, **memcache_limits}


# One round at a stalled Datastore: retries until retry_deadline, the last attempt's
# rpc_timeout past it, and a backoff wait between.
DATASTORE_ROUND = (
    SHORT_DATASTORE["retry_deadline"]
    + SHORT_DATASTORE["rpc_timeout"]
    + SHORT_DATASTORE["retry_max_wait"]
)
# memcache calls a call may wait out at a stalled memcached, one after another.
MEMCACHE_CALLS = 8
MEMCACHE_ROUND = MEMCACHE_CALLS * SHORT_MEMCACHE["memcache_timeout"]
#: Added to every budget: scheduling, connecting and Python's own time on a loaded
#: 2-core machine. In the runs measured no call went past its budget at all (the
#: slowest used 84 % of it), so the slack is there for the machine, not the code.
SLACK = 5.0


def budget(cell: Cell, fault: str) -> float:
    """Seconds the call may take under ``fault``, before the slack."""
    seconds = cell.extra
    if fault in DATASTORE_FAULTS:
        seconds += cell.rounds * DATASTORE_ROUND
    if fault in (*MEMCACHE_FAULTS, BOTH_DOWN):
        seconds += cell.rounds * MEMCACHE_ROUND
    return seconds


# -- the backends a cell breaks -----------------------------------------------------------


class World:
    """One engine's emulator (the session's) and a memcached of this module's own."""

    def __init__(self, stack: BackendStack, engine: str, memcached: Memcached) -> None:
        self.emulator = stack.emulator(engine)
        self.memcached = memcached
        self.closed_port = free_port()  # nothing listens there: connections are refused

    def env(self, *, datastore_refusing: bool) -> dict[str, str]:
        env: dict[str, str] = dict(self.emulator.env())
        if datastore_refusing:
            env["DATASTORE_EMULATOR_HOST"] = f"127.0.0.1:{self.closed_port}"
        env["MEMCACHED_HOSTS"] = self.memcached.address
        return env

    @contextlib.contextmanager
    def broken(self, fault: str, scene: Scene) -> Iterator[None]:
        """The fault for the block. Datastore refusing is in the env the objects were made
        with already, but for connections a cell made before (its own hooks cut them).

        Each heal is registered before its fault, so that a fault that fails half-way
        (a pause that times out after SIGSTOP was sent) is healed all the same.
        """
        with contextlib.ExitStack() as heal:
            if fault in (DS_REFUSING, BOTH_DOWN):
                for hook in scene.on_datastore_refusing:
                    hook()
            if fault == DS_STALLED:
                heal.callback(self.emulator.resume)
                self.emulator.pause()
            if fault in (MC_REFUSING, BOTH_DOWN):
                heal.callback(self.memcached.start)
                self.memcached.kill()
            if fault == MC_STALLED:
                heal.callback(self.memcached.resume)
                self.memcached.pause()
            yield


@pytest.fixture(scope="module")
def matrix_memcached() -> Iterator[Memcached]:
    server = Memcached().start()
    try:
        yield server
    finally:
        if server.alive:
            server.resume()  # a paused server would not stop
        server.stop()


@pytest.fixture(scope="module")
def worlds(
    sharded_counter_backends: BackendStack, matrix_memcached: Memcached
) -> Callable[[str], World]:
    made: dict[str, World] = {}

    def world(engine: str) -> World:
        if engine not in made:
            made[engine] = World(sharded_counter_backends, engine, matrix_memcached)
        return made[engine]

    return world


def first_engine(config_: pytest.Config) -> str:
    """The engine of the cells that run on one engine: the first of --sc-engines."""
    return str(config_.getoption("--sc-engines")).split(",")[0].strip()


# -- one cell -------------------------------------------------------------------------------


class Scene:
    """What a cell's steps share: the name it counts (or locks) under, where the engine's
    emulator listens, what to undo afterwards, and what to cut when Datastore refuses."""

    def __init__(self, emulator_address: str) -> None:
        self.emulator_address = emulator_address  # host:port of the engine's emulator
        self.name = f"matrix-{uuid.uuid4().hex[:12]}"
        self.cleanups: list[Callable[[], object]] = []
        self.on_datastore_refusing: list[Callable[[], object]] = []

    def later(self, cleanup: Callable[[], object]) -> None:
        self.cleanups.append(cleanup)


Act = Callable[[], object]
AsyncAct = Callable[[], Awaitable[object]]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One row of the matrix: how to prepare (healthy backends, default limits), how to
    make the objects called (short limits), and the call itself."""

    key: str  # "Counter.increment", or with a variant: "Counter.increment[key]"
    build: Callable[[Scene], Act] | None = None
    abuild: Callable[[Scene], Awaitable[AsyncAct]] | None = None
    prepare: Callable[[Scene], None] | None = None
    datastore: bool = True  # does it reach Datastore at all?
    rounds: int = 1  # retry rounds (or memcache call rounds) it may take one after another
    extra: float = 0.0  # seconds beyond the rounds, for a time limit the settings do not set
    counts: int | None = None  # the delta the call adds to the counter, if it counts it
    # What the cell had pending before the call (in memcache, or in a CounterBuffer that
    # its cleanup flushes once healthy): counted once afterwards, whatever the call did.
    keeps: int = 0
    keeps_in_memcache: bool = False

    @property
    def member(self) -> str:
        return self.key.split("[", 1)[0]


@dataclasses.dataclass(frozen=True)
class Observed:
    outcome: str  # what the call did: its act's word, "ok", or the error's name
    seconds: float
    name: str  # the counter (or lock, or series) the cell used


def run_cell(cell: Cell, world: World, fault: str, patch: pytest.MonkeyPatch) -> Observed:
    """Prepare, break, call, heal; return what the call did and how long it took."""
    scene = Scene(world.emulator.address)
    # Each cell starts from an empty memcached: nothing another cell left (a flusher's
    # list of pending counters, say) can make it slower or different.
    world.memcached.flush_all()

    def healthy() -> None:
        for key, value in world.env(datastore_refusing=False).items():
            patch.setenv(key, value)
        config["sharded_counter"] = dict(PREPARING)

    def faulty() -> None:
        for key, value in world.env(datastore_refusing=fault in (DS_REFUSING, BOTH_DOWN)).items():
            patch.setenv(key, value)
        config["sharded_counter"] = short_limits(fault)

    if cell.abuild is not None:
        outcome, seconds = asyncio.run(
            _run_async(cell, cell.abuild, world, fault, scene, healthy, faulty)
        )
        return Observed(outcome, seconds, scene.name)
    assert cell.build is not None
    healthy()
    if cell.prepare is not None:
        cell.prepare(scene)
    faulty()
    act = cell.build(scene)
    try:
        with world.broken(fault, scene):
            started = time.monotonic()
            outcome = outcome_of(act)
            seconds = time.monotonic() - started
    finally:
        healthy()
        undo(scene)
    return Observed(outcome, seconds, scene.name)


async def _run_async(
    cell: Cell,
    abuild: Callable[[Scene], Awaitable[AsyncAct]],
    world: World,
    fault: str,
    scene: Scene,
    healthy: Callable[[], None],
    faulty: Callable[[], None],
) -> tuple[str, float]:
    try:
        healthy()
        if cell.prepare is not None:
            cell.prepare(scene)
        faulty()
        act = await abuild(scene)
        with world.broken(fault, scene):
            started = time.monotonic()
            try:
                outcome = label(await act())
            except Exception as exc:
                outcome = error_label(exc)
            seconds = time.monotonic() - started
    finally:
        healthy()
        undo(scene)
        await aclose()
    return outcome, seconds


def undo(scene: Scene) -> None:
    for cleanup in reversed(scene.cleanups):
        with contextlib.suppress(Exception):  # cleanups only tidy up: the cell is decided
            cleanup()


def outcome_of(act: Act) -> str:
    try:
        return label(act())
    except Exception as exc:
        return error_label(exc)


def label(result: object) -> str:
    """How a call that returned is named in the matrix: its act's own word, else "ok"."""
    return result if isinstance(result, str) else "ok"


def error_label(exc: BaseException) -> str:
    """Our errors by name; anything else is an escape, named with its module. Each of our
    errors here comes of a backend's failure, which it keeps as ``__cause__``."""
    if isinstance(exc, ShardedCounterError):
        if exc.__cause__ is None:
            return f"{type(exc).__name__} without its cause: {exc}"
        return type(exc).__name__
    return f"ESCAPED {type(exc).__module__}.{type(exc).__name__}: {str(exc)[:160]}"


# -- the rows ---------------------------------------------------------------------------------

# Counters are prepared with healthy backends and default limits: a total of 5, and
# then read, so memcache holds a complete cached total (as for any counter in use).
PREPARED_TOTAL = 5


def prepare_counter(scene: Scene) -> None:
    counter = Counter(scene.name)
    counter.increment(PREPARED_TOTAL)
    assert counter.count == PREPARED_TOTAL


def prepare_bounded(scene: Scene) -> None:
    counter = BoundedCounter(scene.name, maximum=1000)
    counter.increment(PREPARED_TOTAL)
    assert counter.count == PREPARED_TOTAL


def total(value: int, expected: int = PREPARED_TOTAL) -> str:
    """A read that returned must return the true total: "ok". "shards only": the shards'
    sum, without what memcache holds pending (it could not be read). Else what it said."""
    if value == expected:
        return "ok"
    return "shards only" if value == PREPARED_TOTAL else f"wrong total {value}, not {expected}"


def totals(values: dict[str, int], name: str) -> str:
    """``get_counts`` of the prepared counter and of one never written (and never cached)."""
    return total(values[name]) if values[name + "-other"] == 0 else f"wrong totals {values}"


async def read_total(read: Awaitable[int]) -> str:
    return total(await read)


async def read_totals(read: Awaitable[dict[str, int]], name: str) -> str:
    return totals(await read, name)


def how_written(counter: Counter, call: Callable[[], object]) -> str:
    """Run an increment; name how it was counted (the counter's own write tallies)."""
    before = counter.stats.snapshot()
    call()
    after = counter.stats.snapshot()
    for tally in ("unsure", "stashed"):
        if after[tally] > before[tally]:
            return tally
    return "written"


def counter_rows(cls: type[Counter], prepare: Callable[[Scene], None]) -> list[Cell]:
    """The rows ``Counter`` and ``BoundedCounter`` share."""
    prefix = cls.__name__

    def make(scene: Scene) -> Counter:
        return cls(scene.name, maximum=1000) if cls is BoundedCounter else cls(scene.name)

    def calling(call: Callable[[Counter], object]) -> Callable[[Scene], Act]:
        """A row's build: the counter is made now (short limits); the act calls ``call``."""

        def build(scene: Scene) -> Act:
            counter = make(scene)
            return lambda: call(counter)

        return build

    def assign(counter: Counter) -> None:
        counter.count = 3

    def other_name(scene: Scene) -> Act:
        return lambda: totals(cls.get_counts([scene.name, scene.name + "-other"]), scene.name)

    return [
        Cell(f"{prefix}()", build=calling(lambda c: None), datastore=False),
        Cell(
            f"{prefix}.increment",
            prepare=prepare,
            build=calling(lambda c: how_written(c, lambda: c.increment(7))),
            counts=7,
        ),
        Cell(
            f"{prefix}.increment[idempotency_key]",
            prepare=prepare,
            build=calling(lambda c: c.increment(7, idempotency_key="k-1")),
            counts=7,
        ),
        Cell(f"{prefix}.get_count", prepare=prepare, build=calling(lambda c: total(c.get_count()))),
        Cell(
            f"{prefix}.get_count[nocache]",
            prepare=prepare,
            build=calling(lambda c: total(c.get_count(nocache=True))),
        ),
        Cell(f"{prefix}.count", prepare=prepare, build=calling(lambda c: total(c.count))),
        Cell(f"{prefix}.count[set]", prepare=prepare, build=calling(assign)),
        Cell(f"{prefix}.set_count", prepare=prepare, build=calling(lambda c: c.set_count(3))),
        Cell(f"{prefix}.get_counts", prepare=prepare, build=other_name),
        Cell(f"{prefix}.verify", prepare=prepare, build=calling(lambda c: c.verify())),
        Cell(
            f"{prefix}.repair",
            prepare=prepare,
            build=calling(lambda c: c.repair()),
            rounds=4,  # resolve unsure writes, fold the stash, rebuild the record, verify
        ),
        Cell(f"{prefix}.delete", prepare=prepare, build=calling(lambda c: c.delete())),
        Cell(
            f"{prefix}.write_mode",
            prepare=prepare,  # this process has probed the engine (as any that wrote)
            build=calling(lambda c: "ok" if c.write_mode in ("transform", "transaction") else "?"),
        ),
    ]


def joined_transaction(scene: Scene) -> Act:
    """``increment(transaction=txn)`` in a transaction the caller began while all was well.

    The caller's own client reaches the emulator through a relay of this cell's own, so
    that "Datastore refusing" can come after the begin: the relay is cut (every
    connection broken, new ones refused), as when the server goes down.
    """
    host, port = scene.emulator_address.rsplit(":", 1)
    relay = ReplyHoldingRelay(host, int(port))
    scene.later(relay.close)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{relay.port}")
        client = datastore_client()
    txn = client.transaction()  # type: ignore[no-untyped-call]
    txn.begin()
    scene.later(txn.rollback)
    scene.on_datastore_refusing.append(relay.cut)
    counter = Counter(scene.name)
    return lambda: counter.increment(7, transaction=txn)


def defer_row(scene: Scene) -> Act:
    counter = Counter(scene.name)
    return lambda: counter.defer(7) and None


def write_pending_row(scene: Scene) -> Act:
    return Counter(scene.name).write_pending


def prepare_pending(scene: Scene) -> None:
    prepare_counter(scene)
    Counter(scene.name).defer(2)


def try_increment_row(scene: Scene) -> Act:
    counter = BoundedCounter(scene.name, maximum=1000)
    return lambda: counter.try_increment(7) and None


def set_bounds_row(scene: Scene) -> Act:
    counter = BoundedCounter(scene.name, maximum=1000)
    return lambda: counter.set_bounds(maximum=2000)


def bounds_in_datastore_row(scene: Scene) -> Act:
    counter = BoundedCounter(scene.name, maximum=1000)
    return lambda: counter.bounds_in_datastore() and None


def shares_row(scene: Scene) -> Act:
    counter = BoundedCounter(scene.name, maximum=1000)
    return lambda: counter.shares() and None


def new_buffer() -> CounterBuffer:
    return CounterBuffer(interval=3600.0, timeout=1.0, max_attempts=1)


def buffer_with_pending(scene: Scene) -> CounterBuffer:
    buffer = new_buffer()
    buffer.increment(scene.name, 7)
    # Healthy again, the cleanup writes what is left: counted once (check_counted), and
    # nothing is left to flush at interpreter exit.
    scene.later(buffer.flush)
    return buffer


def flushed(buffer: CounterBuffer, name: str, flush: Callable[[], object]) -> str:
    """Flush; name where the amount went. A flush that raises must keep it pending here."""
    before = buffer.pending(name)
    try:
        flush()
    except ShardedCounterError:
        assert buffer.pending(name) == before, "a failed flush lost what was pending"
        raise
    assert buffer.pending(name) == 0, "a flush that returned left the amount pending"
    # Written to a shard, or (its write failing, on the last try) stashed in delayed_incr.
    return "stashed" if Counter(name)._pending_stash() >= before else "written"


def buffer_flush_row(scene: Scene) -> Act:
    buffer = buffer_with_pending(scene)
    return lambda: flushed(buffer, scene.name, buffer.flush)


def buffer_stop_row(scene: Scene) -> Act:
    buffer = buffer_with_pending(scene)
    return lambda: flushed(buffer, scene.name, buffer.stop)


def buffer_count_row(scene: Scene) -> Act:
    buffer = buffer_with_pending(scene)  # 7 pending here
    return lambda: total(buffer.count(scene.name), PREPARED_TOTAL + 7)


def buffer_keyed_row(scene: Scene) -> Act:
    buffer = new_buffer()
    return lambda: buffer.increment(scene.name, 7, idempotency_key="k-1")


def buffer_increment_row(scene: Scene) -> Act:
    buffer = buffer_with_pending(scene)
    return lambda: buffer.increment(scene.name, 3)


def buffer_async_increment_row(scene: Scene) -> Act:
    buffer = buffer_with_pending(scene)
    return lambda: buffer.async_increment(scene.name, 3)


def buffer_pending_row(scene: Scene) -> Act:
    buffer = buffer_with_pending(scene)
    return lambda: buffer.pending(scene.name)


def shared_buffer(scene: Scene, **options: Any) -> SharedBuffer:
    return SharedBuffer(interval=3600.0, **options)


def prepare_shared(scene: Scene) -> None:
    prepare_counter(scene)
    SharedBuffer(interval=3600.0).increment(scene.name, 2)


def shared_increment_row(scene: Scene) -> Act:
    buffer = shared_buffer(scene)
    return lambda: buffer.increment(scene.name, 7)


def shared_direct_row(scene: Scene) -> Act:
    buffer = shared_buffer(scene, on_cache_failure="direct")
    return lambda: buffer.increment(scene.name, 7)


def shared_pending_row(scene: Scene) -> Act:
    buffer = shared_buffer(scene)
    # 2 are pending (prepare_shared): a 0 is memcache unread, not an answer.
    return lambda: "returns 0" if buffer.pending(scene.name) == 0 else "ok"


def shared_count_row(scene: Scene) -> Act:
    buffer = shared_buffer(scene)  # 2 pending in memcache (prepare_shared)
    return lambda: total(buffer.count(scene.name), PREPARED_TOTAL + 2)


def shared_flush_row(scene: Scene) -> Act:
    buffer = shared_buffer(scene)
    return lambda: buffer.flush(scene.name) and None


def shared_flush_round_row(scene: Scene) -> Act:
    buffer = shared_buffer(scene)

    def act() -> str:
        outcome = buffer.flush_round()  # never raises: what failed is in its result
        return "reported" if outcome.failed or outcome.listing_error else "ok"

    return act


def shared_flush_holder_row(scene: Scene) -> Act:
    buffer = shared_buffer(scene)
    return lambda: buffer.flush_holder(scene.name) and None


def shared_flush_all_row(scene: Scene) -> Act:
    buffer = shared_buffer(scene)
    return lambda: buffer.flush() and None


def shared_stop_row(scene: Scene) -> Act:
    buffer = shared_buffer(scene)
    return buffer.stop


def decision_word(decision: Any) -> str:
    return "allowed" if decision.allowed else "refused"


def limiter_row(method: str, on_outage: str = "open") -> Callable[[Scene], Act]:
    def build(scene: Scene) -> Act:
        limiter = RateLimiter("100/minute", on_outage=on_outage)  # type: ignore[arg-type]
        call = getattr(limiter, method)
        return lambda: decision_word(call(scene.name))

    return build


def limited_row(scene: Scene) -> Act:
    limiter = RateLimiter("100/minute")
    limited = limiter.limit(lambda key: key)(lambda key: "allowed")
    return lambda: limited(scene.name)


SERIES_RESOLUTIONS = ((10, 3600), (60, 86400))


def series_row(method: str, *, durable: bool = False) -> Callable[[Scene], Act]:
    def build(scene: Scene) -> Act:
        series = TimeSeries(scene.name, SERIES_RESOLUTIONS, durable=durable)
        now = time.time()
        calls: dict[str, Callable[[], object]] = {
            "incr": lambda: series.incr("k", 3),
            "sum": lambda: series.sum("k", now - 600, now),
            "series": lambda: series.series("k", now - 600, now, 60) and None,
            "rollup": lambda: series.rollup("k"),
        }
        return calls[method]

    return build


def prepare_series(scene: Scene) -> None:
    # A complete bucket (from two minutes ago) for rollup and durable sums to move or read.
    TimeSeries(scene.name, SERIES_RESOLUTIONS, durable=True).incr("k", 3, at=time.time() - 120)


def held_lease(scene: Scene) -> Lease:
    # Taken with the cell's limits while memcached is up; the next cell empties it.
    return lock(scene.name, ttl=30).acquire()


def lease_row(method: str) -> Callable[[Scene], Act]:
    def build(scene: Scene) -> Act:
        if method in ("acquire", "__enter__"):
            lease = lock(scene.name, ttl=30)
            call = getattr(lease, method)
            return lambda: call() and "taken"
        lease = held_lease(scene)
        if method == "__exit__":
            return lambda: lease.__exit__(None, None, None)
        if method == "extend":
            return lambda: "extended" if lease.extend() else "not extended"
        return lambda: "released" if lease.release() else "not released"

    return build


def who_holds_row(scene: Scene) -> Act:
    return lambda: who_holds(scene.name) and None


# -- asyncio rows -------------------------------------------------------------------------------


def async_counter_row(method: str) -> Callable[[Scene], Awaitable[AsyncAct]]:
    async def build(scene: Scene) -> AsyncAct:
        counter = AsyncCounter(scene.name)

        async def increment() -> str:
            before = counter.stats.snapshot()
            await counter.increment(7)
            after = counter.stats.snapshot()
            for tally in ("unsure", "stashed"):
                if after[tally] > before[tally]:
                    return tally
            return "written"

        calls: dict[str, AsyncAct] = {
            "increment": increment,
            "increment[idempotency_key]": lambda: counter.increment(7, idempotency_key="k-1"),
            "get_count": lambda: asyncio.ensure_future(read_total(counter.get_count())),
            "get_counts": lambda: asyncio.ensure_future(
                read_totals(
                    AsyncCounter.get_counts([scene.name, scene.name + "-other"]), scene.name
                )
            ),
            "set_count": lambda: counter.set_count(3),
            "delete": counter.delete,
        }
        return calls[method]

    return build


def constructing(make: Callable[[Scene], object]) -> Callable[[Scene], Awaitable[AsyncAct]]:
    """A row whose act makes an object inside the event loop, as asyncio code would."""

    async def build(scene: Scene) -> AsyncAct:
        async def act() -> None:
            make(scene)

        return act

    return build


def async_limiter_row(
    method: str, on_outage: str = "open"
) -> Callable[[Scene], Awaitable[AsyncAct]]:
    async def build(scene: Scene) -> AsyncAct:
        limiter = AsyncRateLimiter("100/minute", on_outage=on_outage)  # type: ignore[arg-type]

        async def call() -> str:
            if method == "limit":
                limited = limiter.limit(lambda key: key)(_allowed)
                return await limited(scene.name)
            return decision_word(await getattr(limiter, method)(scene.name))

        return call

    return build


async def _allowed(key: str) -> str:
    return "allowed"


def async_lease_row(method: str) -> Callable[[Scene], Awaitable[AsyncAct]]:
    async def build(scene: Scene) -> AsyncAct:
        lease = alock(scene.name, ttl=30)
        if method in ("acquire", "__aenter__"):
            call = getattr(lease, method)

            async def take() -> str:
                await call()
                return "taken"

            return take
        await lease.acquire()

        async def act() -> str | None:
            if method == "__aexit__":
                await lease.__aexit__(None, None, None)
                return None
            if method == "extend":
                return "extended" if await lease.extend() else "not extended"
            return "released" if await lease.release() else "not released"

        return act

    return build


async def async_plain(call: Callable[[], Awaitable[object]]) -> AsyncAct:
    return call


CELLS: list[Cell] = [
    *counter_rows(Counter, prepare_counter),
    # Its read in the caller's transaction is one attempt of the counter's rpc_timeout.
    Cell("Counter.increment[transaction]", prepare=prepare_counter, build=joined_transaction),
    Cell("Counter.defer", prepare=prepare_counter, build=defer_row, datastore=False, counts=7),
    Cell(
        "Counter.write_pending",
        prepare=prepare_pending,
        build=write_pending_row,
        rounds=2,
        keeps=2,
        keeps_in_memcache=True,
    ),
    *counter_rows(BoundedCounter, prepare_bounded),
    Cell(
        "BoundedCounter.try_increment",
        prepare=prepare_bounded,
        build=try_increment_row,
        counts=7,
    ),
    Cell("BoundedCounter.set_bounds", prepare=prepare_bounded, build=set_bounds_row),
    Cell(
        "BoundedCounter.bounds_in_datastore",
        prepare=prepare_bounded,
        build=bounds_in_datastore_row,
    ),
    Cell("BoundedCounter.shares", prepare=prepare_bounded, build=shares_row),
    Cell("CounterBuffer()", build=lambda s: lambda: new_buffer() and None, datastore=False),
    Cell(
        "CounterBuffer.increment",
        build=buffer_increment_row,
        datastore=False,
        counts=3,
        keeps=7,
    ),
    Cell("CounterBuffer.increment[idempotency_key]", build=buffer_keyed_row, counts=7),
    Cell(
        "CounterBuffer.async_increment",
        build=buffer_async_increment_row,
        datastore=False,
        counts=3,
        keeps=7,
    ),
    Cell("CounterBuffer.pending", build=buffer_pending_row, datastore=False, keeps=7),
    Cell("CounterBuffer.count", prepare=prepare_counter, build=buffer_count_row, keeps=7),
    Cell(
        "CounterBuffer.flush",
        prepare=prepare_counter,
        build=buffer_flush_row,
        rounds=2,
        keeps=7,
    ),
    Cell("CounterBuffer.stop", prepare=prepare_counter, build=buffer_stop_row, rounds=2, keeps=7),
    Cell("SharedBuffer()", build=lambda s: lambda: shared_buffer(s) and None, datastore=False),
    Cell(
        "SharedBuffer.increment",
        prepare=prepare_counter,
        build=shared_increment_row,
        datastore=False,
        counts=7,
    ),
    Cell(
        "SharedBuffer.increment[direct]",
        prepare=prepare_counter,
        build=shared_direct_row,
        rounds=2,
        counts=7,
    ),
    Cell(
        "SharedBuffer.pending",
        prepare=prepare_shared,
        build=shared_pending_row,
        datastore=False,
        keeps=2,
        keeps_in_memcache=True,
    ),
    Cell(
        "SharedBuffer.count",
        prepare=prepare_shared,
        build=shared_count_row,
        keeps=2,
        keeps_in_memcache=True,
    ),
    Cell(
        "SharedBuffer.flush",
        prepare=prepare_shared,
        build=shared_flush_row,
        rounds=2,
        keeps=2,
        keeps_in_memcache=True,
    ),
    Cell(
        "SharedBuffer.flush_round",
        prepare=prepare_shared,
        build=shared_flush_round_row,
        rounds=2,
        keeps=2,
        keeps_in_memcache=True,
    ),
    Cell(
        "SharedBuffer.flush_holder",
        prepare=prepare_shared,
        build=shared_flush_holder_row,
        datastore=False,
        keeps=2,
        keeps_in_memcache=True,
    ),
    Cell(
        "SharedBuffer.flush[all]",
        prepare=prepare_shared,
        build=shared_flush_all_row,
        rounds=2,
        keeps=2,
        keeps_in_memcache=True,
    ),
    Cell(
        "SharedBuffer.stop",
        prepare=prepare_shared,
        build=shared_stop_row,
        rounds=2,
        keeps=2,
        keeps_in_memcache=True,
    ),
    Cell(
        "RateLimiter()", build=lambda s: lambda: RateLimiter("100/minute") and None, datastore=False
    ),
    Cell("RateLimiter.hit", build=limiter_row("hit"), datastore=False),
    Cell("RateLimiter.hit[closed]", build=limiter_row("hit", "closed"), datastore=False),
    Cell("RateLimiter.hit[raise]", build=limiter_row("hit", "raise"), datastore=False),
    Cell("RateLimiter.test", build=limiter_row("test"), datastore=False),
    Cell("RateLimiter.limit", build=limited_row, datastore=False),
    Cell("TimeSeries()", build=lambda s: lambda: TimeSeries(s.name) and None, datastore=False),
    Cell("TimeSeries.incr", build=series_row("incr"), datastore=False),
    Cell("TimeSeries.sum", build=series_row("sum"), datastore=False),
    Cell("TimeSeries.series", build=series_row("series"), datastore=False),
    Cell("TimeSeries.sum[durable]", prepare=prepare_series, build=series_row("sum", durable=True)),
    Cell(
        "TimeSeries.series[durable]",
        prepare=prepare_series,
        build=series_row("series", durable=True),
    ),
    Cell(
        "TimeSeries.rollup",
        prepare=prepare_series,
        build=series_row("rollup", durable=True),
        rounds=2,
    ),
    Cell("lock()", build=lambda s: lambda: lock(s.name) and None, datastore=False),
    Cell("Lease.acquire", build=lease_row("acquire"), datastore=False),
    Cell("Lease.__enter__", build=lease_row("__enter__"), datastore=False),
    Cell("Lease.extend", build=lease_row("extend"), datastore=False),
    Cell("Lease.release", build=lease_row("release"), datastore=False),
    Cell("Lease.__exit__", build=lease_row("__exit__"), datastore=False),
    Cell("who_holds()", build=who_holds_row, datastore=False),
    Cell("purge_expired_keys()", build=lambda s: lambda: purge_expired_keys() and None),
    Cell("AsyncCounter()", abuild=constructing(lambda s: AsyncCounter(s.name)), datastore=False),
    *(
        Cell(
            f"AsyncCounter.{method}",
            prepare=prepare_counter,
            abuild=async_counter_row(method),
            counts=7 if method.startswith("increment") else None,
        )
        for method in (
            "increment",
            "increment[idempotency_key]",
            "get_count",
            "get_counts",
            "set_count",
            "delete",
        )
    ),
    Cell(
        "AsyncRateLimiter()",
        abuild=constructing(lambda s: AsyncRateLimiter("9/minute")),
        datastore=False,
    ),
    Cell("AsyncRateLimiter.hit", abuild=async_limiter_row("hit"), datastore=False),
    Cell(
        "AsyncRateLimiter.hit[closed]", abuild=async_limiter_row("hit", "closed"), datastore=False
    ),
    Cell("AsyncRateLimiter.hit[raise]", abuild=async_limiter_row("hit", "raise"), datastore=False),
    Cell("AsyncRateLimiter.test", abuild=async_limiter_row("test"), datastore=False),
    Cell("AsyncRateLimiter.limit", abuild=async_limiter_row("limit"), datastore=False),
    Cell(
        "alock()",
        abuild=constructing(lambda s: alock(s.name)),
        datastore=False,
    ),
    Cell("AsyncLease.acquire", abuild=async_lease_row("acquire"), datastore=False),
    Cell("AsyncLease.__aenter__", abuild=async_lease_row("__aenter__"), datastore=False),
    Cell("AsyncLease.extend", abuild=async_lease_row("extend"), datastore=False),
    Cell("AsyncLease.release", abuild=async_lease_row("release"), datastore=False),
    Cell("AsyncLease.__aexit__", abuild=async_lease_row("__aexit__"), datastore=False),
    Cell("drain()", abuild=lambda s: async_plain(drain), datastore=False),
    Cell("aclose()", abuild=lambda s: async_plain(aclose), datastore=False),
]

#: Public members that make no call to a backend, and why (the coverage test's other half).
NO_IO = {
    "Counter.shards_in_use": "a number this process keeps",
    "Counter.shard_count": "deprecated alias of shards, a setting",
    "Counter.stats": "tallies this object keeps",
    "BoundedCounter.shards_in_use": "a number this process keeps",
    "BoundedCounter.shard_count": "deprecated alias of shards, a setting",
    "BoundedCounter.stats": "tallies this object keeps",
    "BoundedCounter.defer": "raises TypeError before any call: nothing is deferred",
    "BoundedCounter.write_pending": "raises TypeError before any call: nothing is pending",
    "SharedBuffer.start_flusher": "starts a thread; its rounds are SharedBuffer.flush_round",
    "SharedBuffer.flusher_running": "whether this process's thread is alive",
    "reconnect()": "forgets this process's connections; opens none",
    "TimeSeries.plan": "arithmetic on the resolutions",
    "Decision()": "a value",
    "Holder()": "a value",
    "Holder.ttl": "arithmetic on the holder's expiry",
    "Lease()": "made by lock(), whose row it is",
    "Limit()": "a value",
    "Limit.parse": "parses a string",
    "Settings()": "a value, checked on construction",
    "Verification()": "a value",
    "Verification.ok": "compares two numbers",
    "config": "a dict",
    "AsyncCounter.shards_in_use": "a number this process keeps",
    "AsyncCounter.stats": "tallies this object keeps",
    "AsyncLease()": "made by alock(), whose row it is",
}


# -- what each call does under each fault --------------------------------------------------------

# One column per fault, in FAULTS' order; "a | b": either is allowed (the engines, or how a
# stalled call's time runs out, may differ).
_ = "ok"
NOT_RECORDED = "IncrementNotRecorded"
UNKNOWN = "IncrementOutcomeUnknown"
DS_DOWN = "DatastoreUnavailable"
MC_DOWN = "CacheUnavailable"

OK5 = (_, _, _, _, _)
READ = (DS_DOWN, DS_DOWN, _, _, DS_DOWN)  # reads sum the shards when memcache is out
CACHED_READ = (_, _, _, _, DS_DOWN)  # a complete cached total is read without Datastore
CACHE_CHECK = (DS_DOWN, DS_DOWN, MC_DOWN, MC_DOWN, MC_DOWN)  # memcache must answer
# Stalled: the classic engine's transaction read times out, which may have been the
# commit's (kept unsure); on Firestore a transform's BeginTransaction times out first,
# which wrote nothing (stashed), or its commit does (unsure).
PLAIN_INCREMENT = ("stashed", "unsure | stashed", "written", "written", NOT_RECORDED)
KEYED_INCREMENT = (NOT_RECORDED, UNKNOWN, _, _, NOT_RECORDED)
BOUNDED_INCREMENT = (NOT_RECORDED, f"{NOT_RECORDED} | {UNKNOWN}", _, _, NOT_RECORDED)
CACHE_ONLY = (_, _, MC_DOWN, MC_DOWN, MC_DOWN)
# A set checks its value against the engine's limits (a probe), then takes delayed_incr.
SET = (DS_DOWN, DS_DOWN, MC_DOWN, MC_DOWN, DS_DOWN)
LIMITER_OPEN = ("allowed",) * 5

EXPECTED: dict[str, tuple[str, str, str, str, str]] = {
    **{
        (f"{cls}{row}" if row == "()" else f"{cls}.{row}"): outcomes
        for cls in ("Counter", "BoundedCounter")
        for row, outcomes in {
            "()": OK5,
            "get_count": CACHED_READ,
            "get_count[nocache]": READ,
            "count": CACHED_READ,
            "count[set]": READ,
            "set_count": READ,
            "get_counts": READ,
            "verify": CACHE_CHECK,
            "repair": CACHE_CHECK,
            "delete": CACHE_CHECK,
            "write_mode": (DS_DOWN, _, _, _, DS_DOWN),
        }.items()
    },
    # A set takes what delayed_incr holds first (I6): memcache must answer. A bounded
    # counter keeps nothing in memcache, so its set needs only Datastore.
    "Counter.count[set]": SET,
    "Counter.set_count": SET,
    "Counter.increment": PLAIN_INCREMENT,
    "Counter.increment[idempotency_key]": KEYED_INCREMENT,
    "Counter.increment[transaction]": (NOT_RECORDED, NOT_RECORDED, _, _, NOT_RECORDED),
    "Counter.defer": CACHE_ONLY,
    "Counter.write_pending": (DS_DOWN, _, _, _, _),
    "BoundedCounter.increment": (
        NOT_RECORDED,
        f"{NOT_RECORDED} | {UNKNOWN}",
        "written",
        "written",
        NOT_RECORDED,
    ),
    "BoundedCounter.increment[idempotency_key]": BOUNDED_INCREMENT,
    "BoundedCounter.try_increment": BOUNDED_INCREMENT,
    "BoundedCounter.set_bounds": READ,
    "BoundedCounter.bounds_in_datastore": READ,
    "BoundedCounter.shares": READ,
    "CounterBuffer()": OK5,
    "CounterBuffer.increment": OK5,
    "CounterBuffer.increment[idempotency_key]": KEYED_INCREMENT,
    "CounterBuffer.async_increment": OK5,
    "CounterBuffer.pending": OK5,
    "CounterBuffer.count": CACHED_READ,
    "CounterBuffer.flush": ("stashed", UNKNOWN, "written", "written", NOT_RECORDED),
    "CounterBuffer.stop": ("stashed", UNKNOWN, "written", "written", NOT_RECORDED),
    "SharedBuffer()": OK5,
    "SharedBuffer.increment": CACHE_ONLY,
    "SharedBuffer.increment[direct]": (_, _, _, _, NOT_RECORDED),
    "SharedBuffer.pending": CACHE_ONLY,
    "SharedBuffer.count": (_, _, "shards only", "shards only", DS_DOWN),
    "SharedBuffer.flush": (DS_DOWN, _, MC_DOWN, MC_DOWN, MC_DOWN),
    "SharedBuffer.flush[all]": (DS_DOWN, _, MC_DOWN, MC_DOWN, MC_DOWN),
    # A flusher's round never raises: each failure is reported in its result.
    "SharedBuffer.flush_round": ("reported", _, "reported", "reported", "reported"),
    "SharedBuffer.flush_holder": CACHE_ONLY,
    "SharedBuffer.stop": (DS_DOWN, _, MC_DOWN, MC_DOWN, MC_DOWN),
    **{
        (f"{cls}{row}" if row == "()" else f"{cls}.{row}"): outcomes
        for cls in ("RateLimiter", "AsyncRateLimiter")
        for row, outcomes in {
            "()": OK5,
            "hit": LIMITER_OPEN,
            "hit[closed]": ("allowed", "allowed", "refused", "refused", "refused"),
            "hit[raise]": ("allowed", "allowed", MC_DOWN, MC_DOWN, MC_DOWN),
            "test": LIMITER_OPEN,
            "limit": LIMITER_OPEN,
        }.items()
    },
    "TimeSeries()": OK5,
    "TimeSeries.incr": CACHE_ONLY,
    "TimeSeries.sum": CACHE_ONLY,
    "TimeSeries.series": CACHE_ONLY,
    "TimeSeries.sum[durable]": CACHE_CHECK,
    "TimeSeries.series[durable]": CACHE_CHECK,
    # A bucket moves by a keyed Counter write, never stashed: the bucket stays put when
    # it is not recorded, and a later rollup finishes a move whose outcome is unknown.
    "TimeSeries.rollup": (
        NOT_RECORDED,
        f"{NOT_RECORDED} | {UNKNOWN}",
        MC_DOWN,
        MC_DOWN,
        MC_DOWN,
    ),
    "lock()": OK5,
    "alock()": OK5,
    **{
        f"{cls}.{row}": outcomes
        for cls in ("Lease", "AsyncLease")
        for row, outcomes in {
            "acquire": ("taken", "taken", MC_DOWN, MC_DOWN, MC_DOWN),
            "extend": ("extended", "extended", MC_DOWN, MC_DOWN, MC_DOWN),
            "release": ("released", "released", "not released", "not released", "not released"),
        }.items()
    },
    "Lease.__enter__": ("taken", "taken", MC_DOWN, MC_DOWN, MC_DOWN),
    "Lease.__exit__": OK5,
    "AsyncLease.__aenter__": ("taken", "taken", MC_DOWN, MC_DOWN, MC_DOWN),
    "AsyncLease.__aexit__": OK5,
    "who_holds()": CACHE_ONLY,
    "purge_expired_keys()": READ,
    "AsyncCounter()": OK5,
    "AsyncCounter.increment": PLAIN_INCREMENT,
    "AsyncCounter.increment[idempotency_key]": KEYED_INCREMENT,
    "AsyncCounter.get_count": CACHED_READ,
    "AsyncCounter.get_counts": READ,
    "AsyncCounter.set_count": SET,
    "AsyncCounter.delete": CACHE_CHECK,
    "drain()": OK5,
    "aclose()": OK5,
}


def expected_outcomes(key: str, fault: str) -> set[str]:
    return {part.strip() for part in EXPECTED[key][FAULTS.index(fault)].split("|")}


# -- the tests -------------------------------------------------------------------------------------


def _member_names(obj: Any) -> list[str]:
    members = []
    for attr in dir(obj):
        if attr.startswith("_") and attr not in (
            "__enter__",
            "__exit__",
            "__aenter__",
            "__aexit__",
        ):
            continue
        value = inspect.getattr_static(obj, attr)
        if isinstance(value, (property, classmethod, staticmethod)) or inspect.isfunction(value):
            members.append(attr)
    return members


def public_api() -> set[str]:
    """Every exported class, function and value, and every public member of each class."""
    names: set[str] = set()
    for module in (sharded_counter, sharded_counter.aio):
        for export in module.__all__:
            obj = getattr(module, export)
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                continue  # the errors are the matrix's outcomes, not its rows
            if inspect.isclass(obj):
                names.add(f"{export}()")
                names.update(f"{export}.{member}" for member in _member_names(obj))
            elif callable(obj):
                names.add(f"{export}()")
            else:
                names.add(export)
    return names


def test_every_public_call_has_a_row() -> None:
    """A public method added without a row (or a row for one that is gone) fails here."""
    covered = {cell.member for cell in CELLS} | set(NO_IO)
    api = public_api()
    assert sorted(api - covered) == [], "public calls the error matrix does not cover"
    assert sorted(covered - api) == [], "rows for calls that are not public (any more)"
    keys = [cell.key for cell in CELLS]
    assert len(keys) == len(set(keys)), "two rows share a key"
    assert sorted(EXPECTED) == sorted(keys), "rows without an expectation, or the reverse"


def on_both_engines(cell: Cell, fault: str) -> bool:
    """Datastore refusing or stalled, for a call that reaches Datastore: the engines'
    write and read paths differ there. "both down" meets the same refusal first, and
    its outcome is decided by memcache failing after it: one engine."""
    return cell.datastore and fault in (DS_REFUSING, DS_STALLED)


def _cells(both_engines: bool) -> list[Any]:
    params = []
    for cell in CELLS:
        for fault in FAULTS:
            if on_both_engines(cell, fault) != both_engines:
                continue
            marks = []
            reason = KNOWN_ESCAPES.get((cell.key, fault))
            if reason is not None:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            params.append(pytest.param(cell, fault, id=f"{cell.key}-{fault}", marks=marks))
    return params


#: Cells that still let a raw error out: strict, so a fix shows here as an unexpected
#: pass. None today; the table stays for the next one found.
KNOWN_ESCAPES: dict[tuple[str, str], str] = {}


def check(cell: Cell, fault: str, engine: str, observed: Observed) -> None:
    outcome, seconds = observed.outcome, observed.seconds
    allowed = budget(cell, fault) + SLACK
    print(
        f"\n[matrix] {cell.key} | {fault} | {engine} | {outcome} | {seconds:.2f}s of {allowed:.2f}s"
    )
    assert outcome in expected_outcomes(cell.key, fault), (
        f"{cell.key} under {fault} ({engine}): {outcome}; "
        f"expected {EXPECTED[cell.key][FAULTS.index(fault)]}"
    )
    assert seconds <= allowed, f"{cell.key} under {fault} took {seconds:.2f}s (> {allowed:.2f}s)"
    check_counted(cell, fault, observed)


def check_counted(cell: Cell, fault: str, observed: Observed) -> None:
    """What the call said must be true: with both backends healthy again (and the cell's
    cleanups done), the total has an increment's delta if the call returned, not if it
    was not recorded, and either if its outcome is unknown; and what was pending before
    the call is counted once, but where a memcached restart lost it (the documented loss
    window of what memcache holds)."""
    if cell.counts is None and not cell.keeps:
        return
    delta = cell.counts or 0
    if observed.outcome in (NOT_RECORDED, MC_DOWN, DS_DOWN):
        deltas = {0}
    elif observed.outcome == UNKNOWN:
        deltas = {0, delta}
    else:
        deltas = {delta}
    lost = cell.keeps_in_memcache and fault in (MC_REFUSING, BOTH_DOWN)
    allowed = {(0 if lost else cell.keeps) + each for each in deltas}
    before = PREPARED_TOTAL if cell.prepare is not None else 0
    added = Counter(observed.name).get_count(nocache=True) - before
    assert added in allowed, (
        f"{cell.key} said {observed.outcome}, and added {added} (allowed: {sorted(allowed)})"
    )


@pytest.mark.parametrize(("cell", "fault"), _cells(both_engines=True))
def test_a_datastore_fault(
    cell: Cell,
    fault: str,
    sharded_counter_engine: str,
    worlds: Callable[[str], World],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls that reach Datastore, with Datastore at fault: on both engines."""
    world = worlds(sharded_counter_engine)
    check(cell, fault, sharded_counter_engine, run_cell(cell, world, fault, monkeypatch))


@pytest.mark.parametrize(("cell", "fault"), _cells(both_engines=False))
def test_a_fault_on_one_engine(
    cell: Cell,
    fault: str,
    pytestconfig: pytest.Config,
    worlds: Callable[[str], World],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """memcache faults, and calls that never reach Datastore: on one engine."""
    engine = first_engine(pytestconfig)
    world = worlds(engine)
    check(cell, fault, engine, run_cell(cell, world, fault, monkeypatch))


#: How the docs word an outcome (our errors are named as they are).
DOC_WORDS = {
    "ok": "returns",
    "written": "written",
    "stashed": "kept in `delayed_incr`",
    "unsure": "kept as an unsure write",
    "shards only": "the shards' sum, without what is pending in memcache",
    "allowed": "allowed",
    "refused": "refused",
    "taken": "taken",
    "extended": "extended",
    "released": "released",
    "not released": "returns `False`",
}


def doc_cell(key: str, fault: str) -> str:
    words = [
        DOC_WORDS.get(outcome, f"`{outcome}`") for outcome in sorted(expected_outcomes(key, fault))
    ]
    mark = " †" if (key, fault) in KNOWN_ESCAPES else ""
    return " or ".join(words) + mark


#: The docs' tables, one per group of rows: (heading, the rows' prefixes).
GROUPS = (
    ("Counter", ("Counter",)),
    ("BoundedCounter", ("BoundedCounter",)),
    ("Buffers", ("CounterBuffer", "SharedBuffer")),
    ("Rate limits", ("RateLimiter",)),
    ("Time series", ("TimeSeries",)),
    ("Locks", ("lock", "Lease", "who_holds")),
    ("Maintenance", ("purge_expired_keys",)),
    ("asyncio", ("AsyncCounter", "AsyncRateLimiter", "alock", "AsyncLease", "drain", "aclose")),
)


def row_prefix(key: str) -> str:
    return re.split(r"[.(\[]", key, maxsplit=1)[0]


def render_table() -> str:
    """``EXPECTED`` as the Markdown tables of docs/errors.md, rows in ``CELLS``' order."""
    header = ["| call | " + " | ".join(FAULTS) + " |", "|---" * (len(FAULTS) + 1) + "|"]
    parts = []
    for heading, prefixes in GROUPS:
        lines = [f"### {heading}", "", *header]
        for cell in CELLS:
            if row_prefix(cell.key) in prefixes:
                row = " | ".join(doc_cell(cell.key, fault) for fault in FAULTS)
                lines.append(f"| `{cell.key}` | {row} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def test_every_row_is_in_a_table() -> None:
    grouped = {prefix for _, prefixes in GROUPS for prefix in prefixes}
    assert sorted({row_prefix(cell.key) for cell in CELLS} - grouped) == []


def test_the_docs_show_the_matrix() -> None:
    """docs/errors.md holds ``render_table()`` as it is (``python tests/test_error_matrix.py``
    prints it)."""
    page = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
    assert render_table() in page.read_text(encoding="utf-8")


if __name__ == "__main__":
    print(render_table())
