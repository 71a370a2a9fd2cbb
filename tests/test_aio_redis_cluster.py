"""``AsyncRedisClusterCache`` (aio/redis_cluster.py) on a real Redis Cluster, beside the
blocking ``RedisClusterClient``: the same answers to the same calls across many
slots, reads split by slot over every primary, a slot moved under the client (ASK,
then MOVED) with each call run once, a paused primary whose write is not resent, and
a killed primary whose promoted replica is cleaned of counter records first.

The session's cluster (``sharded_counter_redis_cluster``: 3 primaries, 3 replicas)
serves the calls that leave it as it is; the faults get clusters of their own. All
faults are real: ``CLUSTER SETSLOT`` moves a slot as ``redis-cli --cluster
reshard`` does, SIGSTOP pauses a primary, SIGKILL kills one.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from faultkit import report
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymemcache.exceptions import MemcacheClientError
from redis.exceptions import TryAgainError

from sharded_counter.aio import AsyncCounter, aclose
from sharded_counter.aio.redis_cluster import AsyncRedisClusterCache, ClusterRefused
from sharded_counter.cache.redis.cluster import RedisClusterClient
from sharded_counter.cache.redis.slots import slot_of
from sharded_counter.core.cache_url import parse_cache_url
from sharded_counter.errors import CacheUnavailable, ShardedCounterError
from sharded_counter.settings import Settings
from sharded_counter_emulator.redis_cluster import RedisCluster
from sharded_counter_emulator.redis_server import RedisServer

pytestmark = pytest.mark.backends

T = TypeVar("T")

# How long the promoted replica may take: the node timeout is 1 s; the election and
# the gossip take a few more on a loaded 2-core machine.
FAILOVER_TIMEOUT = 30.0


def need_redis_cli() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are not installed")


@pytest.fixture(scope="module")
def redis_cluster(request: pytest.FixtureRequest) -> RedisCluster:
    """The session's Redis Cluster (3 primaries, 3 replicas)."""
    need_redis_cli()
    cluster: RedisCluster = request.getfixturevalue("sharded_counter_redis_cluster")
    return cluster


def async_cache(cluster: RedisCluster, *, timeout: float = 5.0) -> AsyncRedisClusterCache:
    limits = Settings(memcache_timeout=timeout, memcache_connect_timeout=timeout)
    return AsyncRedisClusterCache(parse_cache_url(cluster.url), limits, outage=None)


def blocking_client(cluster: RedisCluster) -> RedisClusterClient:
    return RedisClusterClient(
        [(node.host, node.port) for node in cluster.nodes], connect_timeout=5.0, timeout=5.0
    )


class Loop:
    """One event loop that a synchronous test runs coroutines on, one at a time."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coroutine)

    def close(self) -> None:
        self._loop.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    yield running
    running.close()


def node_id(cluster: RedisCluster, node: RedisServer) -> str:
    return cluster.command(node, "CLUSTER", "MYID").strip()


# -- the same answers as the blocking cluster client ---------------------------------------

# Twelve names, so a sequence's keys are in up to twelve slots on all three primaries.
_NAMES = [f"n{i}" for i in range(12)]
_name = st.sampled_from(_NAMES)
_VALUES = [b"", b"0", b"7", b"41", b"18446744073709551615", b"x", b"12 ", b"-3", b"\x00\xff"]
_value = st.sampled_from(_VALUES)
_expire = st.sampled_from([0, 100, -1])
_OPS = st.one_of(
    st.tuples(st.sampled_from(["get", "gets", "delete"]), _name),
    st.tuples(st.sampled_from(["get_many", "gets_many"]), st.lists(_name, max_size=6)),
    st.tuples(st.just("add"), _name, _value, _expire),
    st.tuples(st.just("cas"), _name, _value, st.sampled_from(["latest", "oldest"]), _expire),
    st.tuples(st.just("append"), _name, _value),
    st.tuples(st.sampled_from(["incr", "decr"]), _name, st.sampled_from([0, 1, 5, 2**64 - 1])),
)


class Replay:
    """Runs ops on one client under keys of its own, answering in one shape for both
    clients: tokens differ between runs, so a ``gets`` answers whether its token is
    one read before, and a ``cas`` names its token by when it was read. Where the
    asyncio calls answer otherwise by design (``cas`` of a missing key is False,
    ``delete`` answers nothing) the blocking answer is read as the asyncio one."""

    def __init__(self, client: Any, run: Any) -> None:
        self.client = client
        self.run_call = run  # a call's result, from the client's method and arguments
        self.prefix = f"same-{uuid.uuid4().hex[:12]}"
        self.tokens: dict[str, list[Any]] = {name: [] for name in _NAMES}

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def run(self, op: tuple[Any, ...]) -> Any:
        try:
            return self._run(op)
        except MemcacheClientError:
            return "refused"

    def _call(self, method: str, *args: Any) -> Any:
        return self.run_call(getattr(self.client, method), *args)

    def _run(self, op: tuple[Any, ...]) -> Any:
        verb, name, *rest = op
        if verb in ("get_many", "gets_many"):
            found = self._call(verb, [self.key(n) for n in name])
            if verb == "gets_many":
                found = {k: value for k, (value, _cas) in found.items()}
            return {k.rpartition(":")[2]: v for k, v in found.items()}
        key = self.key(name)
        if verb == "gets":
            value, cas = self._call("gets", key)
            seen = cas in self.tokens[name]
            if cas is not None:
                self.tokens[name].append(cas)
            return value, seen
        if verb == "cas":
            value, which, expire = rest
            if not self.tokens[name]:
                return "no token yet"
            token = self.tokens[name][-1 if which == "latest" else 0]
            return self._call("cas", key, value, token, expire) is True
        if verb == "delete":
            self._call("delete", key)
            return "deleted"
        return self._call(verb, key, *rest)


@pytest.fixture(scope="module")
def twins(redis_cluster: RedisCluster) -> Iterator[tuple[Replay, Replay]]:
    """A replay on the blocking cluster client and one on the asyncio cache, which
    runs its calls on a loop of the module's own."""
    blocking = blocking_client(redis_cluster)
    running = Loop()
    cache = async_cache(redis_cluster)
    yield (
        Replay(blocking, lambda method, *args: method(*args)),
        Replay(cache, lambda method, *args: running.run(method(*args))),
    )
    running.run(cache.close())
    running.close()
    blocking.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_OPS, min_size=5, max_size=40))
def test_random_calls_get_the_blocking_cluster_clients_answers(
    ops: list[tuple[Any, ...]], twins: tuple[Replay, Replay]
) -> None:
    on_threads, on_asyncio = twins
    prefix = uuid.uuid4().hex[:12]  # fresh keys for this example, on either side
    on_threads.prefix, on_asyncio.prefix = f"t-{prefix}", f"a-{prefix}"
    for replay in twins:
        replay.tokens = {name: [] for name in _NAMES}
    setup = [("add", name, b"1", 0) for name in _NAMES[::2]] + [("gets", n) for n in _NAMES]
    for i, op in enumerate(setup + ops):
        assert on_asyncio.run(op) == on_threads.run(op), (i, op)


# -- reads across slots --------------------------------------------------------------------


def test_one_get_many_reads_keys_on_all_three_primaries(
    redis_cluster: RedisCluster, loop: Loop
) -> None:
    cache = async_cache(redis_cluster)
    prefix = f"slots-{uuid.uuid4().hex[:12]}"
    keys = [f"{prefix}:{i}" for i in range(300)]

    async def main() -> None:
        for i, key in enumerate(keys):
            assert await cache.add(key, str(i).encode()) is True
        assert await cache.get_many([*keys, f"{prefix}:missing"]) == {
            key: str(i).encode() for i, key in enumerate(keys)
        }
        tokens = await cache.gets_many(keys)
        assert [await cache.cas(k, b"new", tokens[k][1]) for k in keys[:20]] == [True] * 20
        assert await cache.get_many(keys[:20]) == dict.fromkeys(keys[:20], b"new")
        await cache.close()

    slots = {slot_of(key) for key in keys}
    assert redis_cluster.slot_of(keys[0]) == slot_of(keys[0])
    views = redis_cluster.views(redis_cluster.primaries()[0])
    holders = {v.address for v in views if v.primary and any(v.holds(s) for s in slots)}
    assert len(slots) > 250 and len(holders) == 3, (len(slots), holders)
    loop.run(main())


# -- a slot moved under the client ---------------------------------------------------------


def test_a_slot_moved_away_is_followed_through_ask_and_moved_and_each_call_runs_once(
    redis_cluster: RedisCluster, loop: Loop
) -> None:
    """The key's slot is moved to another primary while the cache holds the old map:
    during the move the old primary answers ASK, after it MOVED. Each call follows
    and runs once (an incr run twice would show in the value)."""
    cache = async_cache(redis_cluster)
    key = f"moved-{uuid.uuid4().hex[:12]}"
    source = redis_cluster.primary_for(key)
    target = next(n for n in redis_cluster.primaries() if n is not source)
    slot = str(redis_cluster.slot_of(key))
    source_id, target_id = node_id(redis_cluster, source), node_id(redis_cluster, target)

    async def before_the_move() -> None:
        assert await cache.get(key) is None  # the cache's map: the slot is at the source

    async def while_moving() -> None:
        assert await cache.add(key, b"5") is True  # ASK: made on the target
        assert await cache.incr(key, 1) == 6  # ASK again

    async def after_the_move() -> None:
        assert await cache.incr(key, 1) == 7  # MOVED, then the target
        assert await cache.get(key) == b"7"
        assert await cache.incr(key, 1) == 8  # the map now says the target
        await cache.close()

    loop.run(before_the_move())
    redis_cluster.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    redis_cluster.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    loop.run(while_moving())
    for node in (target, source):
        redis_cluster.command(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    loop.run(after_the_move())
    assert redis_cluster.command(target, "GET", key).strip().endswith(":8")


def test_a_read_of_a_slot_half_moved_is_refused_as_never_run(
    redis_cluster: RedisCluster, loop: Loop
) -> None:
    """While a slot is being moved, a multi-key read finding only some of its keys at
    the old primary gets ``TRYAGAIN``: ``ClusterRefused``, nothing ran. (The hash tag
    puts both keys in one slot, as one ``MGET`` needs; the library's keys need none.)"""
    cache = async_cache(redis_cluster)
    tag = "{" + uuid.uuid4().hex[:12] + "}"
    here, missing = f"{tag}:here", f"{tag}:missing"
    source = redis_cluster.primary_for(here)
    target = next(n for n in redis_cluster.primaries() if n is not source)
    slot = str(redis_cluster.slot_of(here))
    source_id, target_id = node_id(redis_cluster, source), node_id(redis_cluster, target)
    assert loop.run(cache.add(here, b"1")) is True
    redis_cluster.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    redis_cluster.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    try:
        with pytest.raises(ClusterRefused) as refused:
            loop.run(cache.get_many([here, missing]))
    finally:
        for node in (target, source):  # the move called off: the slot stays at the source
            redis_cluster.command(node, "CLUSTER", "SETSLOT", slot, "STABLE")
    assert refused.value.maybe_applied is False
    assert isinstance(refused.value.__cause__, TryAgainError)
    assert loop.run(cache.get_many([here, missing])) == {here: b"1"}
    loop.run(cache.close())


# -- a paused primary: a write not answered is not resent -----------------------------------


@pytest.fixture(scope="module")
def slow_to_fail_over() -> Iterator[RedisCluster]:
    """A cluster of this module's own whose primaries may be paused: with a node
    timeout of 60 s, no replica takes over while one is."""
    need_redis_cli()
    cluster = RedisCluster(node_timeout_ms=60_000).start()
    try:
        yield cluster
    finally:
        for node in cluster.nodes:
            with contextlib.suppress(Exception):
                node.resume()
        cluster.stop()


def test_an_incr_that_timed_out_may_have_landed_and_is_never_resent(
    slow_to_fail_over: RedisCluster, loop: Loop
) -> None:
    """The key's primary is SIGSTOPped: an ``incr`` goes out on a pooled connection and
    is not answered within 1 s. Once the primary runs again the counter went up
    once at most, and the cache answers again."""
    cluster = slow_to_fail_over
    # A paused node never answers, so any limit shows the timeout; 1 s leaves the
    # calls around it room on a loaded machine.
    cache = async_cache(cluster, timeout=1.0)
    key = f"stalled-{uuid.uuid4().hex[:12]}"
    assert loop.run(cache.add(key, b"0")) is True  # the connection the incr reuses
    primary = cluster.primary_for(key)
    primary.pause()
    try:
        with pytest.raises(CacheUnavailable) as timed_out:
            loop.run(cache.incr(key, 1))
    finally:
        primary.resume()
    assert timed_out.value.maybe_applied is True
    assert isinstance(timed_out.value, TimeoutError)
    value = loop.run(cache.get(key))
    assert value in (b"0", b"1"), value  # ran once or not at all, never twice
    assert loop.run(cache.incr(key, 1)) == int(value or b"") + 1
    loop.run(cache.close())


# -- a killed primary: the promoted replica, cleaned first ----------------------------------


@pytest.fixture
def own_cluster() -> Iterator[RedisCluster]:
    """A cluster of this test's own: its primary will be killed."""
    need_redis_cli()
    cluster = RedisCluster(node_timeout_ms=1000).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_after_a_failover_calls_reach_the_promoted_replica_cleaned_of_counter_records(
    own_cluster: RedisCluster, loop: Loop
) -> None:
    """A record on the killed primary's replica may miss its last merges, so the cache
    deletes counter records on a node it sees promoted before it sends it anything
    else; stashes and other keys stay, and records on other primaries are untouched.
    (The hash tag puts the test's keys in one slot; the library's keys need none.)"""
    cluster = own_cluster
    cache = async_cache(cluster, timeout=1.0)
    tag = "{" + uuid.uuid4().hex[:8] + "}"
    record, stash, window = f"{tag}:t:{'a' * 40}", f"{tag}:delayed_incr:{'a' * 40}", f"{tag}:w"
    primary = cluster.primary_for(record)
    elsewhere = next(
        key
        for key in (f"{{o{i}}}:t:{'b' * 40}" for i in range(100))
        if cluster.primary_for(key) is not primary
    )

    async def main() -> RedisServer:
        for key in (record, stash, window, elsewhere):
            assert await cache.add(key, b"7") is True
        # The fault from a thread, the loop running meanwhile as an app's does: it
        # hears the killed primary close the pooled connections.
        await asyncio.to_thread(cluster.wait_replicated, primary)  # none of the four lost
        await asyncio.to_thread(cluster.kill_primary_of, record)
        promoted = await asyncio.to_thread(
            cluster.wait_for_failover, record, timeout=FAILOVER_TIMEOUT
        )
        assert await cache.get(window) == b"7"  # finds the new primary, cleans it, reads
        assert await cache.get_many([record, stash, window, elsewhere]) == {
            stash: b"7",
            window: b"7",
            elsewhere: b"7",
        }
        assert await cache.add(record, b"8") is True  # made afresh: not deleted again
        assert await cache.incr(window, 1) == 8
        assert await cache.get(record) == b"8"
        await cache.close()
        return promoted

    promoted = loop.run(main())
    assert promoted is not primary
    # The calls after the failover reached the promoted replica.
    assert cluster.command(promoted, "GET", window).strip().endswith(":8")
    assert cluster.command(promoted, "GET", record).strip().endswith(":8")


# -- counters end to end: tasks writing through a failover ---------------------------------

WRITERS = 16


def test_asyncio_counts_stay_exact_when_a_primary_is_killed_under_writers(
    sharded_counter_env: dict[str, str], sharded_counter_engine: str, own_cluster: RedisCluster
) -> None:
    """16 tasks increment one ``AsyncCounter`` on the cluster; the primary of its cached
    record is SIGKILLed and its replica promoted while they write, and they write on
    1.5 s after it. Datastore is healthy, so no increment may fail, and every one
    acknowledged is counted once: in the shards and in the cached total (the record
    on the promoted replica was deleted and rebuilt, not trusted)."""
    cluster = own_cluster

    async def main() -> None:
        counter = AsyncCounter(
            f"aio-cluster-kill-{uuid.uuid4().hex[:8]}",
            shards=10,
            rpc_timeout=2.0,
            cache_url=cluster.url,
            memcache_timeout=0.3,
            memcache_connect_timeout=0.3,
        )
        acknowledged = 5
        await counter.increment(5)
        assert await counter.get_count() == 5  # a complete record is cached before the kill
        record = counter._ctx.record_key
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def writer(delta: int) -> None:
            nonlocal acknowledged
            while not stop.is_set():
                try:
                    await counter.increment(delta)
                except ShardedCounterError as exc:
                    failures.append(exc)
                else:
                    acknowledged += delta

        tasks = [asyncio.create_task(writer(i + 1)) for i in range(WRITERS)]
        await asyncio.sleep(0.5)  # writing before the kill
        await asyncio.to_thread(cluster.kill_primary_of, record)
        await asyncio.to_thread(cluster.wait_for_failover, record, timeout=FAILOVER_TIMEOUT)
        promoted_at = acknowledged
        await asyncio.sleep(1.5)  # writing after the promotion
        stop.set()
        await asyncio.gather(*tasks)
        assert failures == [], failures[:3]
        assert acknowledged > promoted_at, "no increment was acknowledged after the promotion"
        assert await counter.get_count(nocache=True) == acknowledged
        assert await counter.get_count() == acknowledged
        await aclose()
        report(
            f"aio-redis-cluster-kill[{sharded_counter_engine}]",
            acknowledged_total=acknowledged,
            acknowledged_after_promotion=acknowledged - promoted_at,
        )

    asyncio.run(main())
