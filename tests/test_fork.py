"""Objects made before a fork work in the child, on the child's own connections.

Pre-forking servers (gunicorn ``--preload``, Celery prefork, ``multiprocessing``)
load the app once, module-level counters and all, and fork workers. A child
that used its parent's memcache socket or gRPC channel would read replies meant
for the parent, so a call reported as failed could have landed. These tests
fork the real test process (``multiprocessing``'s fork context) and run both
processes against the real emulators and memcached.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
from pymemcache.client.base import Client as PlainClient

from sharded_counter import (
    ConfigurationError,
    Counter,
    CounterBuffer,
    RateLimiter,
    SharedBuffer,
    reconnect,
)
from sharded_counter.cache.client import build_client
from sharded_counter.paths.registry import PerCounter
from sharded_counter.process import PerProcess, generation
from sharded_counter.settings import Settings
from sharded_counter_emulator import Memcached, RedisCluster, RedisServer

pytestmark = pytest.mark.backends

FORK = multiprocessing.get_context("fork")

#: Made at import, before any fixture has set the environment: as an app's module-level
#: counter is. The plugin's sharded_counter_env reconnects it to each test's backends.
MODULE_LEVEL = Counter("fork:module-level")


class _Warnings(logging.Handler):
    """The library's warnings in one process (a memcache outage shows as one)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


def _in_children(
    work: Callable[[], dict[str, Any]], *, children: int = 3, with_parent: bool = True
) -> list[dict[str, Any]]:
    """Run ``work`` in ``children`` forked processes (and in this one, at the same time);
    what each returned, with the warnings each logged."""
    results: Any = FORK.Queue()

    def child() -> None:
        warnings = _Warnings()
        logging.getLogger("sharded_counter").addHandler(warnings)
        try:
            out = work()
        except BaseException as exc:  # reported, not lost with the child
            out = {"crashed": repr(exc)}
        results.put({**out, "warnings": warnings.seen, "pid": os.getpid()})

    processes = [FORK.Process(target=child) for _ in range(children)]
    for process in processes:
        process.start()
    outcomes = []
    if with_parent:
        warnings = _Warnings()
        logging.getLogger("sharded_counter").addHandler(warnings)
        try:
            outcomes.append({**work(), "warnings": warnings.seen, "pid": os.getpid()})
        finally:
            logging.getLogger("sharded_counter").removeHandler(warnings)
    outcomes += [results.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    return outcomes


def _connections(server: Memcached | RedisServer | RedisCluster) -> int:
    """How many connections ``server`` (every node of a cluster) has accepted since it
    started."""
    if isinstance(server, RedisCluster):
        return sum(_connections(node) for node in server.nodes)
    if isinstance(server, RedisServer):
        import redis

        plain = _stats_clients.get(server.address)
        if plain is None:  # one connection, kept: each new one would count
            plain = _stats_clients[server.address] = redis.Redis(
                host=server.host, port=server.port, password=server.password
            )
        return int(plain.info("stats")["total_connections_received"])
    stats = _stats_clients.get(server.address)
    if stats is None:
        stats = _stats_clients[server.address] = PlainClient((server.host, server.port))
    return int(stats.stats()[b"total_connections"])


_stats_clients: dict[str, Any] = {}  # pymemcache's or redis-py's, per server


# -- the rule, deterministically: a child opens connections of its own -------------------


def test_making_a_counter_opens_nothing(
    sharded_counter_env: dict[str, str],
    sharded_counter_cache: Memcached | RedisServer | RedisCluster,
) -> None:
    before = _connections(sharded_counter_cache)
    counter = Counter("fork:lazy")
    SharedBuffer()
    CounterBuffer()
    assert _connections(sharded_counter_cache) == before
    counter.increment()
    assert _connections(sharded_counter_cache) > before
    assert counter.get_count(nocache=True) == 1


def test_a_module_level_counter_uses_the_fixtures_backends(
    sharded_counter_env: dict[str, str],
) -> None:
    MODULE_LEVEL.increment(3)
    assert MODULE_LEVEL.get_count(nocache=True) == 3
    assert MODULE_LEVEL._backend.cache.enabled  # the cache came from the fixture
    assert MODULE_LEVEL.count == 3


def test_a_child_opens_its_own_cache_connections(
    sharded_counter_env: dict[str, str],
    sharded_counter_cache: Memcached | RedisServer | RedisCluster,
) -> None:
    address = sharded_counter_cache
    counter = Counter("fork:own-sockets")
    shared = SharedBuffer()
    limiter = RateLimiter("5/second")
    counter.increment()
    shared.increment("fork:own-sockets-shared")
    limiter.hit("parent")
    _connections(address)  # the stats client's own connection, before the count starts
    before = _connections(address)

    def child() -> dict[str, Any]:
        counter.increment()
        shared.increment("fork:own-sockets-shared")
        limiter.hit("child")
        return {"count": counter.get_count(nocache=True)}

    [outcome] = _in_children(child, children=1, with_parent=False)
    assert outcome == {"count": 2, "warnings": [], "pid": outcome["pid"]}
    # The parent's pooled sockets were idle and open: a child that used them would have
    # opened none.
    assert _connections(address) > before
    assert counter.get_count(nocache=True) == 2
    assert shared.count("fork:own-sockets-shared", nocache=True) == 2


def test_clients_passed_in_are_refused_in_a_child(
    sharded_counter_env: dict[str, str],
    sharded_counter_cache: Memcached | RedisServer | RedisCluster,
) -> None:
    client = build_client(Settings(cache_url=sharded_counter_cache.url))
    counter = Counter("fork:given-client", memcache_client=client)
    limiter = RateLimiter("5/second", memcache_client=client)
    counter.increment()

    def child() -> dict[str, Any]:
        refused = []
        for call in (counter.increment, lambda: limiter.hit("k")):
            try:
                call()
            except ConfigurationError as exc:
                refused.append("forked child" in str(exc) and "memcache_client" in str(exc))
        return {"refused": refused}

    [outcome] = _in_children(child, children=1, with_parent=False)
    assert outcome["refused"] == [True, True]
    counter.increment()  # still the parent's to use
    assert counter.get_count(nocache=True) == 2


# -- end to end: made and used before a fork, then written from 4 processes at once -------


def test_objects_made_before_a_fork_count_exactly_from_parent_and_children(
    sharded_counter_env: dict[str, str],
) -> None:
    counter = Counter("fork:counter")
    shared = SharedBuffer(interval=0.5)
    buffered = CounterBuffer(interval=0.2)
    counter.increment()
    shared.increment("fork:shared")
    buffered.increment("fork:buffered")
    buffered.flush()
    rounds = 150

    def work() -> dict[str, Any]:
        done = {"counter": 0, "shared": 0, "buffered": 0}
        errors: list[str] = []
        lock = threading.Lock()

        def writer() -> None:
            for _ in range(rounds // 3):
                for what, call in (
                    ("counter", counter.increment),
                    ("shared", lambda: shared.increment("fork:shared")),
                    ("buffered", lambda: buffered.increment("fork:buffered")),
                ):
                    try:
                        call()
                    except Exception as exc:
                        errors.append(repr(exc))
                    else:
                        with lock:
                            done[what] += 1

        threads = [threading.Thread(target=writer) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        buffered.flush()
        return {**done, "errors": errors}

    outcomes = _in_children(work)
    assert [o.get("crashed") for o in outcomes] == [None] * 4
    assert [o["errors"] for o in outcomes] == [[]] * 4
    # No outage was seen anywhere: a shared socket shows as timeouts and garbled replies.
    assert [o["warnings"] for o in outcomes] == [[]] * 4
    assert len({o["pid"] for o in outcomes}) == 4
    expected = {what: 1 + sum(o[what] for o in outcomes) for what in ("counter", "shared")}
    assert expected == {"counter": 1 + 4 * rounds, "shared": 1 + 4 * rounds}
    assert counter.get_count(nocache=True) == expected["counter"]
    assert counter.count == expected["counter"]
    shared.flush()
    assert shared.pending("fork:shared") == 0
    assert shared.count("fork:shared", nocache=True) == expected["shared"]
    assert shared.count("fork:shared") == expected["shared"]
    # The parent's buffer held nothing at the fork; each child flushed what it added.
    buffered.flush()
    assert Counter("fork:buffered").get_count(nocache=True) == 1 + 4 * rounds


def test_a_buffers_pending_amounts_stay_with_the_parent_at_a_fork(
    sharded_counter_env: dict[str, str],
) -> None:
    buffered = CounterBuffer(interval=60)
    buffered.increment("fork:pending", 5)  # held in the parent, unflushed, at the fork

    def child() -> dict[str, Any]:
        held = buffered.pending("fork:pending")
        buffered.flush()
        return {"held": held}

    [outcome] = _in_children(child, children=1, with_parent=False)
    assert outcome["held"] == 0  # the child starts empty: it neither flushes nor loses them
    assert Counter("fork:pending").get_count(nocache=True) == 0
    buffered.flush()
    assert Counter("fork:pending").get_count(nocache=True) == 5


# -- the mechanisms, without backends -----------------------------------------------------


def test_per_process_values_are_made_again_in_a_child() -> None:
    made: list[int] = []

    def make() -> int:
        made.append(os.getpid())
        return os.getpid()

    value = PerProcess(make)
    assert value.get() == os.getpid() and value.get() == os.getpid()
    assert made == [os.getpid()]
    [outcome] = _in_children(lambda: {"value": value.get()}, children=1, with_parent=False)
    assert outcome["value"] == outcome["pid"] != os.getpid()
    assert value.get() == os.getpid()  # the parent's is untouched
    before = generation()
    reconnect()
    assert generation() == before + 1
    assert value.get() == os.getpid() and made == [os.getpid(), os.getpid()]


def test_the_registry_never_holds_two_objects_for_one_counter() -> None:
    class Combiner:
        """Stands for a counter's combiner (a plain object cannot be held weakly)."""

    registry: PerCounter[Combiner] = PerCounter(Combiner, recent=2)
    held = registry.get("busy")  # in use, as a counter's context holds its combiner
    for other in range(50):
        registry.get(other)  # pushes "busy" out of the recent entries
    assert registry.get("busy") is held  # still in use: never replaced
    assert len(registry) <= 3  # what nothing uses is dropped
    del held
    fresh = registry.get("busy")
    assert registry.get("busy") is fresh
