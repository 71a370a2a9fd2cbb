"""``AsyncRedisCache`` (aio/redis_cache.py) on a real redis-server, beside the blocking
``RedisClient``: the same answers to the same calls, records either shell can read,
a cancelled call that leaves no answer behind, and what each failure means.

A redis-server of the module's own serves the calls; the faults come from
``ReplyHoldingRelay`` (tests/faultkit.py): a network that delivers a request and
holds back its answer, which no server does by itself. Requests pass straight
through, so a write whose answer is held has really been applied.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from faultkit import ReplyHoldingRelay
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymemcache.exceptions import MemcacheClientError

from sharded_counter import (
    Counter,
    Locked,
    RateLimiter,
    config,
    lock,
    reconnect,
    who_holds,
)
from sharded_counter.aio import AsyncCounter, AsyncRateLimiter, aclose, alock
from sharded_counter.aio.backend import async_backend_for, async_cache
from sharded_counter.aio.redis_cache import AsyncRedisCache
from sharded_counter.aio.redis_cluster import AsyncRedisClusterCache
from sharded_counter.cache.redis.client import RedisClient
from sharded_counter.cache.redis.commands import CacheCommandError, CacheNotReached
from sharded_counter.core.cache_url import parse_cache_url
from sharded_counter.errors import CacheUnavailable
from sharded_counter.settings import Settings
from sharded_counter_emulator import free_port
from sharded_counter_emulator.redis_server import RedisServer, redis_command

pytestmark = pytest.mark.backends

T = TypeVar("T")
UINT64_MAX = 2**64 - 1


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """This module's redis-server: every test uses keys of its own."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def held(redis_server: RedisServer) -> Iterator[ReplyHoldingRelay]:
    """A relay to this module's redis-server that can hold its answers back."""
    relay = ReplyHoldingRelay(redis_server.host, redis_server.port)
    yield relay
    relay.close()


def cache_on(url: str, *, timeout: float = 5.0, **options: Any) -> AsyncRedisCache:
    """An ``AsyncRedisCache`` for ``url``, made in the running loop."""
    limits = Settings(memcache_timeout=timeout, memcache_connect_timeout=timeout)
    return AsyncRedisCache(parse_cache_url(url), limits, outage=None, **options)


def in_loop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


def fresh(name: str = "k") -> str:
    return f"aio-{uuid.uuid4().hex[:12]}:{name}"


def eventually(check: Callable[[], bool], *, within: float) -> bool:
    """Whether ``check()`` comes true within ``within`` seconds (polled every 20 ms)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


# -- the same random calls from both shells: the same answers ----------------------------

_NAMES = ["a", "b"]
_VALUES = [
    b"", b"0", b"9", b"10", str(UINT64_MAX).encode(), str(2**64).encode(), b"abc", b" 5",
    b"12\x00x", b"-5", b"3:4", b"\r\n",
]  # fmt: skip
_DELTAS = [0, 1, 9, 10, 2**63, UINT64_MAX]
_EXPIRES = [0, 3600, -1, 30 * 24 * 3600 + 1]  # none, an hour, at once, a unix time in 1970

_name = st.sampled_from(_NAMES)
_OPS = st.one_of(
    st.tuples(st.just("get"), _name),
    st.tuples(st.just("gets"), _name),
    st.tuples(st.just("get_many")),
    st.tuples(st.just("add"), _name, st.sampled_from(_VALUES), st.sampled_from(_EXPIRES)),
    st.tuples(
        st.just("cas"),
        _name,
        st.sampled_from(_VALUES),
        st.sampled_from(["latest", "oldest"]),
        st.sampled_from(_EXPIRES),
    ),
    st.tuples(st.just("append"), _name, st.sampled_from(_VALUES)),
    st.tuples(st.sampled_from(["incr", "decr"]), _name, st.sampled_from(_DELTAS)),
    st.tuples(st.just("delete"), _name),
)


class Replay:
    """Carries out ops under fresh keys, on the blocking client or the asyncio one,
    answering in the asyncio cache's terms (``AsyncCache``): ``cas`` and ``append`` say
    True or False, ``delete`` nothing; a refusal reads "refused" (the blocking client
    raises it, the asyncio cache raises ``CacheUnavailable`` caused by it, saying no
    write landed). A ``gets`` answers whether its token is one read before: tokens are
    the server's clock, different for every write."""

    def __init__(self, perform: Callable[[str, tuple[Any, ...]], Any]) -> None:
        self.perform = perform
        self.prefix = fresh("diff")
        self.tokens: dict[str, list[Any]] = {name: [] for name in _NAMES}

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def run(self, op: tuple[Any, ...]) -> Any:
        try:
            return self._run(op)
        except MemcacheClientError:  # the blocking client's CacheCommandError
            return "refused"
        except CacheUnavailable as exc:
            assert isinstance(exc.__cause__, CacheCommandError), exc
            assert exc.maybe_applied is False  # the server refused: nothing changed
            return "refused"

    def _run(self, op: tuple[Any, ...]) -> Any:
        verb, *args = op
        if verb == "get_many":
            found = self.perform("get_many", ([self.key(n) for n in _NAMES],))
            return {k.rpartition(":")[2]: v for k, v in found.items()}
        name, *rest = args
        key = self.key(name)
        if verb == "gets":
            value, cas = self.perform("gets", (key,))
            seen = cas in self.tokens[name]
            if cas is not None:
                self.tokens[name].append(cas)
            return value, seen
        if verb == "cas":
            value, which, expire = rest
            if not self.tokens[name]:
                return "no token yet"
            token = self.tokens[name][-1 if which == "latest" else 0]
            return self.perform("cas", (key, value, token, expire)) is True
        if verb == "delete":
            self.perform("delete", (key,))
            return "deleted"
        answer = self.perform(verb, (key, *rest))
        return answer is True if verb == "append" else answer


@pytest.fixture(scope="module")
def both_shells(
    redis_server: RedisServer,
) -> Iterator[tuple[Callable[[], Replay], Callable[[], Replay]]]:
    """A maker of replays on the blocking client and on the asyncio cache, which lives
    in one event loop of the module's own."""
    loop = asyncio.new_event_loop()
    blocking = RedisClient(redis_server.host, redis_server.port, timeout=5.0, connect_timeout=5.0)
    asynchronous = cache_on(redis_server.url)

    def on_blocking() -> Replay:
        return Replay(lambda verb, args: getattr(blocking, verb)(*args))

    def on_asyncio() -> Replay:
        return Replay(
            lambda verb, args: loop.run_until_complete(getattr(asynchronous, verb)(*args))
        )

    yield on_blocking, on_asyncio
    loop.run_until_complete(asynchronous.close())
    loop.close()
    blocking.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.lists(st.sampled_from(_VALUES), min_size=len(_NAMES), max_size=len(_NAMES)),
    ops=st.lists(_OPS, min_size=5, max_size=40),
)
def test_random_calls_get_the_same_answers_from_both_shells(
    start: list[bytes], ops: list[tuple[Any, ...]], both_shells: Any
) -> None:
    """Each key starts with a value (and a token read), then the calls run on both."""
    on_blocking, on_asyncio = (make() for make in both_shells)
    setup = [
        op
        for name, v in zip(_NAMES, start, strict=True)
        for op in (("add", name, v, 0), ("gets", name))
    ]
    for i, op in enumerate(setup + ops):
        assert on_asyncio.run(op) == on_blocking.run(op), (i, op)


def test_either_shell_reads_and_swaps_what_the_other_wrote(redis_server: RedisServer) -> None:
    """One record format: a token read by one shell swaps the value in the other."""
    blocking = RedisClient(redis_server.host, redis_server.port)
    key, other = fresh(), fresh()

    async def main() -> None:
        cache = cache_on(redis_server.url)
        assert await cache.add(key, b"from asyncio") is True
        value, token = blocking.gets(key)
        assert value == b"from asyncio"
        assert blocking.cas(key, b"from threads", token) is True
        assert await cache.cas(key, b"stale", token) is False  # the token moved on
        assert await cache.get(key) == b"from threads"
        assert blocking.add(other, b"41") is True
        assert await cache.incr(other, 1) == 42
        _, token = await cache.gets(other)
        assert blocking.cas(other, b"7", token) is True
        assert await cache.get_many([key, other, fresh()]) == {key: b"from threads", other: b"7"}
        await cache.send("delete", other)
        assert blocking.get(other) is None
        await cache.close()

    in_loop(main)
    blocking.close()


def test_a_script_the_server_forgot_is_sent_whole(redis_server: RedisServer) -> None:
    """After SCRIPT FLUSH (or a restart) EVALSHA answers NOSCRIPT, which ran nothing: the
    script is sent whole, and the write is made once."""
    key = fresh()

    async def main() -> tuple[int | None, int | None]:
        cache = cache_on(redis_server.url)
        assert await cache.add(key, b"1") is True
        assert redis_command(redis_server.host, redis_server.port, "SCRIPT", "FLUSH") == b"+OK"
        first = await cache.incr(key, 1)
        second = await cache.incr(key, 1)
        await cache.close()
        return first, second

    assert in_loop(main) == (2, 3)


def test_a_restart_while_idle_costs_no_call() -> None:
    """Pooled connections to a server that restarted are stale: each is opened afresh
    when a call takes it, so the next calls, one per pooled connection and more, all
    reach the new server."""
    server = RedisServer().start()
    try:

        async def main() -> list[Any]:
            cache = cache_on(server.url)
            warm = await asyncio.gather(*(cache.add(f"warm{i}", b"v") for i in range(8)))
            assert warm == [True] * 8 and cache._pool.idle == 8, "setup: eight connections"
            await asyncio.to_thread(server.restart)
            after = [
                (await cache.get(f"warm{i % 8}"), await cache.add(f"after{i}", b"v"))
                for i in range(12)
            ]
            await cache.close()
            return after

        assert in_loop(main) == [(None, True)] * 12  # empty: nothing kept, and no failure
    finally:
        server.stop()


# -- cancellation --------------------------------------------------------------------------


def test_a_call_cancelled_mid_read_leaves_no_answer_for_the_next(
    redis_server: RedisServer, held: ReplyHoldingRelay
) -> None:
    """With one pooled connection, a write whose answer is held is cancelled after the
    server applied it; then the answer is let through. Had the connection gone back to
    the pool with that answer on its way, the next call would read it as its own."""
    direct = RedisClient(redis_server.host, redis_server.port)
    first, second, counter = fresh("first"), fresh("second"), fresh("counter")
    assert direct.add(second, b"two") is True
    assert direct.add(counter, b"10") is True

    async def main() -> list[Any]:
        cache = cache_on(f"redis://127.0.0.1:{held.port}", timeout=30.0, max_pool_size=1)
        assert await cache.get(second) == b"two"  # the one connection is open
        held.hold.set()
        adding = asyncio.create_task(cache.add(first, b"one"))
        # The request passes the relay: once the server holds the key, the call is
        # waiting for its answer.
        applied = await asyncio.to_thread(eventually, lambda: direct.get(first), within=30)
        assert applied, "setup: the add never reached the server"
        assert not adding.done()
        adding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await adding
        held.hold.clear()  # the held answer (add: stored) flows on
        answers = [
            await cache.get(second),
            await cache.incr(counter, 5),
            await cache.add(first, b"again"),
            await cache.gets_many([first, second]),
        ]
        await cache.close()
        return answers

    got, incremented, added, many = in_loop(main)
    assert (got, incremented, added) == (b"two", 15, False)
    assert {k: v for k, (v, _token) in many.items()} == {first: b"one", second: b"two"}
    direct.close()


# -- what a failure means ------------------------------------------------------------------


def test_a_refused_connection_is_never_applied() -> None:
    async def main() -> CacheUnavailable:
        cache = cache_on(f"redis://127.0.0.1:{free_port()}", timeout=1.0)
        with pytest.raises(CacheUnavailable) as refused:
            await cache.add(fresh(), b"v")
        await cache.close()
        return refused.value

    error = in_loop(main)
    assert error.maybe_applied is False
    assert isinstance(error, CacheNotReached)


def test_a_timed_out_write_may_have_landed_and_is_not_sent_again(
    redis_server: RedisServer, held: ReplyHoldingRelay
) -> None:
    """The answer to an ``incr`` is held past the timeout: ``maybe_applied`` is true, and
    it did land, once. A read that times out has changed nothing; and a call that needs
    a new connection while answers are held never gets one (its handshake's answer is
    held too), so it was never sent."""
    direct = RedisClient(redis_server.host, redis_server.port)
    key = fresh()
    assert direct.add(key, b"10") is True

    async def main() -> list[Any]:
        cache = cache_on(f"redis://127.0.0.1:{held.port}", timeout=0.5, max_pool_size=2)
        # Two calls at once open both pooled connections before the answers are held.
        assert await asyncio.gather(cache.get(key), cache.get(key)) == [b"10", b"10"]
        assert cache._pool.idle == 2, "setup: two connections"
        held.hold.set()
        # At once, so each takes a connection already open.
        failures = await asyncio.gather(cache.incr(key, 1), cache.get(key), return_exceptions=True)
        with pytest.raises(CacheUnavailable) as unsent:  # on a connection made afresh
            await cache.add(fresh(), b"v")
        failures.append(unsent.value)
        held.hold.clear()
        assert await cache.get(key) == b"11"  # a new connection, its own answer
        await cache.close()
        return failures

    write, read, unsent = in_loop(main)
    assert all(isinstance(failure, CacheUnavailable) for failure in (write, read, unsent))
    assert write.maybe_applied is True and isinstance(write, TimeoutError)
    assert read.maybe_applied is False and isinstance(read, TimeoutError)
    assert unsent.maybe_applied is False and isinstance(unsent, CacheNotReached)
    assert direct.get(key) == b"11"  # applied once: the write was never sent again
    direct.close()


def test_a_call_that_finds_no_free_connection_in_time_is_never_sent(
    redis_server: RedisServer,
) -> None:
    """With the one pooled connection lent out (taken from the pool here, as a call
    takes it), a write waits for it up to its time limit, then gives up unsent:
    ``maybe_applied`` false, and it never lands."""
    direct = RedisClient(redis_server.host, redis_server.port)
    waiting = fresh("waiting")

    async def main() -> CacheUnavailable:
        cache = cache_on(redis_server.url, timeout=0.5, max_pool_size=1)
        lent = await cache._pool.borrow()
        with pytest.raises(CacheUnavailable) as refused:
            await cache.add(waiting, b"v")
        cache._pool.give_back(lent, reuse=True)
        assert await cache.add(waiting, b"now") is True  # the connection is free again
        await cache.close()
        return refused.value

    refused = in_loop(main)
    assert isinstance(refused, CacheNotReached) and refused.maybe_applied is False
    assert direct.get(waiting) == b"now"  # the first add never landed
    direct.close()


def test_a_password_and_db_come_from_the_url_and_a_wrong_password_is_never_sent() -> None:
    server = RedisServer(password="s3cret/with:odd@chars").start()
    try:
        in_db_3 = RedisClient(server.host, server.port, db=3, password=server.password)
        key = fresh()

        async def main() -> CacheUnavailable:
            good = cache_on(f"{server.url}/3")
            assert await good.add(key, b"v") is True
            await good.close()
            bad = cache_on(f"redis://:wrong@{server.address}")
            with pytest.raises(CacheUnavailable) as refused:
                await bad.add(fresh(), b"v")
            await bad.close()
            return refused.value

        refused = in_loop(main)
        assert in_db_3.get(key) == b"v"
        assert refused.maybe_applied is False and isinstance(refused, ConnectionRefusedError)
        in_db_3.close()
    finally:
        server.stop()


# -- choosing it ---------------------------------------------------------------------------


def test_a_redis_url_gets_this_cache_and_a_cluster_url_the_cluster_cache(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        chosen = async_cache(Settings(cache_url=redis_server.url), outage=None)
        assert isinstance(chosen, AsyncRedisCache) and chosen.enabled
        await chosen.close()
        cluster_url = Settings(cache_url=f"redis+cluster://{redis_server.address}")
        assert isinstance(async_cache(cluster_url, outage=None), AsyncRedisClusterCache)

    in_loop(main)


def test_counters_limits_and_locks_share_redis_with_their_blocking_twins(
    sharded_counter_env: dict[str, str],
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the cache URL naming Redis, ``AsyncCounter``, ``AsyncRateLimiter`` and
    ``alock`` keep their records on it, where the blocking ones find them."""
    monkeypatch.delenv("MEMCACHED_HOSTS", raising=False)
    monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", redis_server.url)
    config["sharded_counter"] = {"memcache_timeout": 10.0, "memcache_connect_timeout": 10.0}
    name, key = fresh("lock"), fresh("user")
    hits = f"aio-on-redis-{uuid.uuid4().hex[:8]}"  # this module's server outlives the engine
    reconnect()

    async def main() -> int | None:
        counter = AsyncCounter(hits)
        await counter.increment(5)
        shell = async_backend_for(counter._ctx.backend, counter.settings).shell
        assert isinstance(shell.memcache, AsyncRedisCache)
        limiter = AsyncRateLimiter("3/minute")
        assert [(await limiter.hit(key)).allowed for _ in range(2)] == [True, True]
        assert RateLimiter("3/minute").hit(key).allowed is True
        assert (await limiter.hit(key)).allowed is False  # one allowance: 3 spent
        async with alock(name, ttl=10):
            assert who_holds(name) is not None
            with pytest.raises(Locked):
                lock(name).acquire()
        assert who_holds(name) is None
        count = await counter.get_count()
        await aclose()
        return count

    assert in_loop(main) == 5
    assert Counter(hits).get_count() == 5
    direct = RedisClient(redis_server.host, redis_server.port)
    assert direct.get(Counter(hits)._record_key) is not None
    direct.close()
