"""``AsyncRateLimiter`` and ``alock`` on a real cache, beside their blocking twins.

The concurrency tests mix the two: one process hits (or locks) from asyncio tasks,
the other from threads, on the same keys, so the steps both drive are shown to
share one allowance and one lock.

The cache is the run's (``--sc-cache``): memcached, named by ``memcached_hosts``; or a
redis-server, named by ``SHARDED_COUNTER_CACHE_URL`` (spawned processes inherit it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from pymemcache.client.base import Client

from sharded_counter import (
    CacheUnavailable,
    Locked,
    RateLimited,
    RateLimiter,
    config,
    lock,
    who_holds,
)
from sharded_counter.aio import AsyncRateLimiter, aclose, alock
from sharded_counter_emulator import free_port


@dataclass
class RunCache:
    """The cache this run names: ``hosts`` to pass as ``memcached_hosts`` (None under
    Redis, whose URL is in the environment), ``address`` (memcached's ``host:port`` or
    Redis's URL) for the raw reads and writes of ``RawStore``."""

    kind: str
    hosts: list[str] | None
    address: str

    def dead(self, monkeypatch: pytest.MonkeyPatch) -> list[str] | None:
        """``hosts`` for a cache of this kind that nothing serves."""
        nowhere = f"127.0.0.1:{free_port()}"
        if self.kind == "memcached":
            return [nowhere]
        monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", f"redis://{nowhere}")
        return None


@pytest.fixture
def run_cache(
    pytestconfig: pytest.Config,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    sharded_counter_cache: object,  # asked for, so that runs with another cache keep us
) -> Iterator[RunCache]:
    monkeypatch.delenv("MEMCACHED_HOSTS", raising=False)
    if pytestconfig.getoption("--sc-cache") == "redis":
        server = request.getfixturevalue("sharded_counter_redis")
        monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", server.url)
        yield RunCache("redis", None, server.url)
    else:
        monkeypatch.delenv("SHARDED_COUNTER_CACHE_URL", raising=False)
        server = request.getfixturevalue("sharded_counter_memcached")
        yield RunCache("memcached", [server.address], server.address)


class RawStore:
    """Plain get and set of a number on the run's cache, for the lock tests' unguarded
    updates and the final read."""

    def __init__(self, cache: RunCache) -> None:
        self._redis: redis.Redis | None = None
        self._memcached: Client | None = None
        if cache.kind == "redis":
            self._redis = redis.Redis.from_url(cache.address)
        else:
            host, port = cache.address.rsplit(":", 1)
            self._memcached = Client((host, int(port)), default_noreply=False)

    def get(self, key: str) -> int:
        if self._redis is not None:
            return int(self._redis.get(key) or b"0")
        assert self._memcached is not None
        return int(self._memcached.get(key) or b"0")

    def set(self, key: str, value: int) -> None:
        if self._redis is not None:
            self._redis.set(key, str(value))
        else:
            assert self._memcached is not None
            self._memcached.set(key, str(value).encode())


def run(main: Any) -> Any:
    async def closing() -> Any:
        try:
            return await main()
        finally:
            await aclose()

    return asyncio.run(closing())


def wait_for_window_start(window: int, need: float) -> None:
    """Sleep until at least ``need`` seconds of the current window remain."""
    left = window - time.time() % window
    if left < need:
        time.sleep(left + 0.01)


# -- rate limits -----------------------------------------------------------------------------


def test_a_window_allows_exactly_the_limit_and_the_sync_limiter_agrees(
    run_cache: RunCache,
) -> None:
    hosts = run_cache.hosts
    key = f"user {uuid.uuid4()}"

    async def main() -> list[bool]:
        limiter = AsyncRateLimiter("5/minute", memcached_hosts=hosts)
        assert (await limiter.test(key)).remaining == 5  # spends nothing
        return [(await limiter.hit(key)).allowed for _ in range(7)]

    wait_for_window_start(60, need=5.0)
    assert run(main) == [True] * 5 + [False] * 2
    sync = RateLimiter("5/minute", memcached_hosts=hosts)
    assert not sync.hit(key).allowed  # the same key: one allowance
    assert sync.test(key).remaining == 0


def test_the_decorator_refuses_calls_over_the_limit(run_cache: RunCache) -> None:
    limiter = AsyncRateLimiter("2/minute", memcached_hosts=run_cache.hosts)
    user = f"u-{uuid.uuid4()}"
    ran: list[int] = []

    @limiter.limit(lambda n: user)
    async def work(n: int) -> int:
        ran.append(n)
        return n * 2

    async def main() -> None:
        assert await work(1) == 2
        assert await work(2) == 4
        with pytest.raises(RateLimited) as refused:
            await work(3)
        assert refused.value.key == user and not refused.value.decision.allowed

    wait_for_window_start(60, need=5.0)
    run(main)
    assert ran == [1, 2]  # the refused call did not run


def test_bad_arguments_raise_before_memcache_is_asked() -> None:
    with pytest.raises(ValueError):
        AsyncRateLimiter("5/fortnight", memcached_hosts=["127.0.0.1:1"])
    with pytest.raises(ValueError, match="strategy"):
        AsyncRateLimiter("5/minute", strategy="leaky", memcached_hosts=["127.0.0.1:1"])  # type: ignore[arg-type]
    limiter = AsyncRateLimiter("5/minute", memcached_hosts=["127.0.0.1:1"])

    async def main() -> None:
        with pytest.raises(TypeError):
            await limiter.hit(5)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await limiter.hit("k", cost=0)

    run(main)


def test_memcache_down_fails_open_closed_or_raises_as_asked(
    run_cache: RunCache, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dead = run_cache.dead(monkeypatch)

    async def main() -> None:
        opened = AsyncRateLimiter("1/minute", memcached_hosts=dead)
        with caplog.at_level(logging.WARNING, logger="sharded_counter"):
            assert all([(await opened.hit("k")).allowed for _ in range(3)])
        closed = AsyncRateLimiter("1/minute", memcached_hosts=dead, on_outage="closed")
        assert not (await closed.hit("k")).allowed
        raising = AsyncRateLimiter("1/minute", memcached_hosts=dead, on_outage="raise")
        with pytest.raises(CacheUnavailable):
            await raising.hit("k")

    run(main)
    opened_outages = [r for r in caplog.records if "allowing every hit" in r.getMessage()]
    assert len(opened_outages) == 1, [r.getMessage() for r in caplog.records]


def _patient_memcache() -> None:
    """Time limits a loaded machine cannot reach: a healthy memcached must never look
    down here (a limiter fails open at an outage, which would miscount the burst),
    and an outage, were there one, raises instead of passing for a decision."""
    config["sharded_counter"] = {"memcache_timeout": 10.0, "memcache_connect_timeout": 10.0}


def _async_hitter(
    hosts: list[str] | None, key: str, tasks: int, hits: int, ready: Any, go: Any, out: Any
) -> None:
    _patient_memcache()

    async def main() -> None:
        limiter = AsyncRateLimiter("50/5 seconds", memcached_hosts=hosts, on_outage="raise")
        await limiter.test("warm up")  # connect before the start line
        ready.put("async")
        while not go.is_set():
            await asyncio.sleep(0.001)

        async def hammer() -> list[tuple[bool, int]]:
            return [
                ((await limiter.hit(key)).allowed, math.floor(time.time() / 5)) for _ in range(hits)
            ]

        outcomes = [
            o for part in await asyncio.gather(*(hammer() for _ in range(tasks))) for o in part
        ]
        out.put(outcomes)

    run(main)


def _sync_hitter(
    hosts: list[str] | None, key: str, threads: int, hits: int, ready: Any, go: Any, out: Any
) -> None:
    _patient_memcache()
    limiter = RateLimiter("50/5 seconds", memcached_hosts=hosts, on_outage="raise")
    limiter.test("warm up")
    ready.put("sync")
    go.wait()
    outcomes: list[tuple[bool, int]] = []
    guard = threading.Lock()

    def hammer() -> None:
        mine = [(limiter.hit(key).allowed, math.floor(time.time() / 5)) for _ in range(hits)]
        with guard:
            outcomes.extend(mine)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put(outcomes)


@pytest.mark.parametrize("other", ["async", "sync"])
def test_exactly_the_limit_under_16_tasks_in_2_processes(run_cache: RunCache, other: str) -> None:
    """16 tasks in one process and 16 tasks (or 16 threads) in another hit one key at
    ``50/5 seconds``: exactly 50 are allowed."""
    context = multiprocessing.get_context("spawn")
    ready, out, go = context.Queue(), context.Queue(), context.Event()
    key = f"user {uuid.uuid4()}"
    hosts = run_cache.hosts  # None under Redis: the children inherit its URL's variable
    second = _async_hitter if other == "async" else _sync_hitter
    processes = [
        context.Process(target=_async_hitter, args=(hosts, key, 16, 16, ready, go, out)),
        context.Process(target=second, args=(hosts, key, 16, 16, ready, go, out)),
    ]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            ready.get(timeout=60)
        wait_for_window_start(5, need=4.0)
        go.set()
        outcomes = [hit for _ in processes for hit in out.get(timeout=60)]
    finally:
        for process in processes:
            process.join(timeout=30)
    assert [p.exitcode for p in processes] == [0, 0]
    assert len(outcomes) == 2 * 16 * 16
    assert len({window for _, window in outcomes}) == 1, "the burst straddled two windows"
    allowed = sum(allowed for allowed, _ in outcomes)
    print(f"\nasync rate limit (async + {other}): allowed={allowed} of {len(outcomes)}, limit 50")
    assert allowed == 50


# -- locks -------------------------------------------------------------------------------------


def test_nowait_waiting_extend_and_release(run_cache: RunCache) -> None:
    hosts = run_cache.hosts
    name = f"crazy {uuid.uuid4()}"

    async def main() -> None:
        async with alock(name, ttl=5, memcached_hosts=hosts) as held:
            with pytest.raises(Locked) as refused:
                await alock(name, memcached_hosts=hosts).acquire()
            assert refused.value.holder is not None
            assert await held.extend(8)
            assert who_holds(name, memcached_hosts=hosts) is not None
            with pytest.raises(Locked):  # the blocking lock sees it too
                lock(name, memcached_hosts=hosts).acquire()

        assert who_holds(name, memcached_hosts=hosts) is None
        waiter = alock(name, ttl=5, nowait=False, timeout=5, memcached_hosts=hosts)
        first = await alock(name, ttl=5, memcached_hosts=hosts).acquire()

        async def let_go() -> None:
            await asyncio.sleep(0.2)
            assert await first.release()

        started = time.monotonic()
        await asyncio.gather(waiter.acquire(), let_go())
        assert 0.15 < time.monotonic() - started < 4.0
        assert await waiter.release()
        assert not await waiter.release()  # not held any more

    run(main)


def test_a_wait_gives_up_after_its_timeout_and_memcache_down_is_reported(
    run_cache: RunCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = run_cache.dead(monkeypatch)

    async def main() -> None:
        with pytest.raises(CacheUnavailable, match="cannot take lock"):
            await alock("x", memcached_hosts=dead).acquire()
        with pytest.raises(TypeError):
            alock(5)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            alock("x", ttl=0, memcached_hosts=dead)

    run(main)


def _async_bumper(cache: RunCache, name: str, key: str, tasks: int, rounds: int) -> None:
    raw = RawStore(cache)

    async def main() -> None:
        async def work() -> None:
            for _ in range(rounds):
                async with alock(
                    name, ttl=10, nowait=False, timeout=60, memcached_hosts=cache.hosts
                ):
                    # Read, yield to the other tasks, write: loses updates without the lock.
                    value = raw.get(key)
                    await asyncio.sleep(0.0005)
                    raw.set(key, value + 1)

        await asyncio.gather(*(work() for _ in range(tasks)))

    run(main)


def _sync_bumper(cache: RunCache, name: str, key: str, threads: int, rounds: int) -> None:
    guard = threading.Lock()  # pymemcache's base Client is not thread-safe
    raw = RawStore(cache)

    def work() -> None:
        for _ in range(rounds):
            with lock(name, ttl=10, nowait=False, timeout=60, memcached_hosts=cache.hosts):
                with guard:
                    value = raw.get(key)
                time.sleep(0.0005)
                with guard:
                    raw.set(key, value + 1)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


@pytest.mark.parametrize("other", ["async", "sync"])
def test_locks_keep_400_of_400_non_atomic_updates(run_cache: RunCache, other: str) -> None:
    """8 tasks in one process and 8 tasks (or 8 threads) in another, 25 rounds each, of a
    read-pause-write on one cache key under one lock: all 400 updates are kept."""
    name, key = f"crazy {uuid.uuid4()}", f"shared:{uuid.uuid4().hex}"
    context = multiprocessing.get_context("spawn")
    second = _async_bumper if other == "async" else _sync_bumper
    processes = [
        context.Process(target=_async_bumper, args=(run_cache, name, key, 8, 25)),
        context.Process(target=second, args=(run_cache, name, key, 8, 25)),
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    final = RawStore(run_cache).get(key)
    print(f"\nasync lock (async + {other}): {final} of 400 updates kept")
    assert final == 400
