"""Single-threaded micro-benchmarks: reading a total, and adding to the buffer.

Reads: the cached ``counter.count`` (one cache ``get_many`` of the record and
the stash, plus decoding the record), the uncached ``get_count(nocache=True)``
(a Datastore query over the shards) and, as the ceiling for the first, a bare
client's ``get`` of one key on the same server: pymemcache's on memcached,
redis-py's ``GET`` on Redis. Buffer: ``CounterBuffer.increment``
against the least any thread-safe in-process counter can do, a dict
increment under a ``threading.Lock``.

What is compared takes turns in short rounds rather than one long run each,
and a ratio is the median of the ratios of rounds run back to back, so a
burst of load from elsewhere on the machine moves one round, not the answer. Loops
are timed without counting proxies in the way (they would cost a fair part
of a memcache get); calls per operation are counted in an untimed pass.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import types
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from pymemcache.client.base import PooledClient

from ...counter import Counter
from ...patterns.buffer import CounterBuffer
from ...settings import parse_host
from .contenders import SHARDS
from .results import Timed
from .rpc_count import CallCounter, counting

_ROUNDS = 9  # ratios are the median over rounds (results.paired_ratio)
_COUNTED = 50  # operations in the untimed pass that counts calls
_SEEDED = 100  # increments behind the counter that the reads read


@dataclasses.dataclass
class _Turns:
    """One operation's rounds added up."""

    operations: int = 0
    elapsed: float = 0.0
    wrong: int = 0
    cpu: float = 0.0  # this process's CPU seconds: steadier than wall time on a busy machine
    round_rates: list[float] = dataclasses.field(default_factory=list)

    def add(self, other: _Turns) -> None:
        self.operations += other.operations
        self.elapsed += other.elapsed
        self.wrong += other.wrong
        self.cpu += other.cpu
        self.round_rates.append(other.operations / other.elapsed if other.elapsed else 0.0)


Round = Callable[[float], _Turns]  # one round of one operation, for so many seconds


def _checked(operation: Callable[[], bool], batch: int) -> Round:
    """Rounds of ``operation``, which says whether its answer was right."""

    def round_(seconds: float) -> _Turns:
        done = wrong = 0
        clock = time.monotonic
        cpu = time.process_time()
        start = clock()
        end = start + seconds
        while clock() < end:
            for _ in range(batch):
                if not operation():
                    wrong += 1
            done += batch
        return _Turns(done, clock() - start, wrong, time.process_time() - cpu)

    return round_


def _calls(function: Callable[[str], None], argument: str, batch: int = 1_000) -> Round:
    """Rounds of ``function(argument)``: the buffer and its baseline pay the same loop."""

    def round_(seconds: float) -> _Turns:
        done = 0
        clock = time.monotonic
        cpu = time.process_time()
        start = clock()
        end = start + seconds
        while clock() < end:
            for _ in range(batch):
                function(argument)
            done += batch
        return _Turns(done, clock() - start, 0, time.process_time() - cpu)

    return round_


def _take_turns(rounds: Sequence[Round], seconds: float) -> list[_Turns]:
    """Each of ``rounds`` gets ``seconds`` in all, in turns; totals in the same order."""
    totals = [_Turns() for _ in rounds]
    for _ in range(_ROUNDS):
        for total, round_ in zip(totals, rounds, strict=True):
            total.add(round_(seconds / _ROUNDS))
    return totals


class _Read(NamedTuple):
    name: str
    label: str
    operation: Callable[[], bool]
    batch: int
    store: object | None  # holds the Datastore calls as ``rpc``
    cache: object  # holds the memcache client as ``_client``


def _bare_client(cache: str, address: str, counter: Counter) -> Any:
    """A client of the cache's own, as an app would make it, with the library's timeouts."""
    host, port = parse_host(address)
    settings = counter.settings
    if cache == "redis":
        import redis  # the redis extra, as the library's own Redis client needs

        return redis.Redis(
            host=host,
            port=port,
            socket_connect_timeout=settings.memcache_connect_timeout,
            socket_timeout=settings.memcache_timeout,
        )
    # Built as the library builds its pooled memcached client.
    return PooledClient(
        (host, port),
        connect_timeout=settings.memcache_connect_timeout,
        timeout=settings.memcache_timeout,
        no_delay=True,
        default_noreply=False,
        max_pool_size=64,
    )


BARE_LABELS = {"memcached": "bare pymemcache get", "redis": "bare redis-py GET"}


def measure_reads(engine: str, cache: str, address: str, seconds: float) -> list[Timed]:
    """The reads, with the library pointed at ``cache`` (a kind) at ``address``."""
    counter = Counter(f"bench-reads-{engine}-{uuid.uuid4().hex[:8]}", shards=SHARDS)
    for _ in range(_SEEDED):
        counter.increment()
    counter.get_count()  # the total is cached from here on

    def cached() -> bool:
        return counter.count == _SEEDED

    def uncached() -> bool:
        return counter.get_count(nocache=True) == _SEEDED

    # Held under the same attribute name as CacheTier holds its client, to be counted
    # the same way.
    bare = types.SimpleNamespace(_client=_bare_client(cache, address, counter))
    key, value = f"bench-bare-{uuid.uuid4().hex[:8]}", str(_SEEDED).encode()
    bare._client.set(key, value)

    def bare_get() -> bool:
        return bool(bare._client.get(key) == value)

    store, tier = counter._backend.store, counter._backend.cache
    reads = [
        _Read("read-cached", "counter.count (cached)", cached, 100, store, tier),
        _Read("read-uncached", "get_count(nocache=True)", uncached, 1, store, tier),
        _Read("read-bare-get", BARE_LABELS[cache], bare_get, 100, None, bare),
    ]
    totals = _take_turns([_checked(r.operation, r.batch) for r in reads], seconds)
    results: list[Timed] = []
    for read, turns in zip(reads, totals, strict=True):
        rpcs, memcache = CallCounter(), CallCounter()
        store_slot = [] if read.store is None else [(read.store, "rpc")]
        with counting(store_slot, rpcs), counting([(read.cache, "_client")], memcache):
            for _ in range(_COUNTED):
                read.operation()
        results.append(
            Timed(
                read.name,
                read.label,
                turns.operations,
                turns.elapsed,
                turns.wrong,
                cpu=turns.cpu,
                rpcs_per_op=sum(rpcs.snapshot().values()) / _COUNTED,
                memcache_per_op=sum(memcache.snapshot().values()) / _COUNTED,
                detail=_per_op(rpcs, memcache),
                round_rates=tuple(turns.round_rates),
            )
        )
    bare._client.close()
    return results


def measure_buffer(engine: str, seconds: float) -> list[Timed]:
    name = f"bench-buffer-micro-{engine}-{uuid.uuid4().hex[:8]}"
    # A long interval: nothing is written while the loop runs.
    buffer = CounterBuffer(interval=3600.0, shards=SHARDS)
    lock = threading.Lock()
    counts: dict[str, int] = {}

    def locked(key: str) -> None:
        with lock:
            counts[key] = counts.get(key, 0) + 1

    buffered, plain = _take_turns([_calls(buffer.increment, name), _calls(locked, name)], seconds)
    buffer.stop()  # one write of everything pending
    counter = Counter(name, shards=SHARDS)
    uncached, cached = counter.get_count(nocache=True), counter.count
    added = buffered.operations
    return [
        Timed(
            "buffer-increment",
            "CounterBuffer.increment",
            added,
            buffered.elapsed,
            wrong=int(uncached != added) + int(cached != added),
            cpu=buffered.cpu,
            detail=f"then one flush: {uncached:,} uncached, {cached:,} cached",
            round_rates=tuple(buffered.round_rates),
        ),
        Timed(
            "dict-under-lock",
            "dict increment under a Lock",
            plain.operations,
            plain.elapsed,
            wrong=int(counts[name] != plain.operations),
            cpu=plain.cpu,
            round_rates=tuple(plain.round_rates),
        ),
    ]


def _per_op(rpcs: CallCounter, memcache: CallCounter) -> str:
    calls = {**rpcs.snapshot(), **memcache.snapshot()}
    return ", ".join(f"{method} {n / _COUNTED:g}" for method, n in calls.items())
