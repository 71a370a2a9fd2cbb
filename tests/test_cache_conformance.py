"""One table of cache behaviours, run against a real memcached, a real redis-server and
a real Redis Cluster.

The cache tier's protocol (docs/protocol.md) leans on memcached's meaning of a few
calls: a cas token that changes with every write, ``cas`` and ``add`` that refuse a
lost race, ``incr`` that never creates a key, expiries, binary-safe values. Each test
here runs once on memcached through the client ``build_client`` makes (pymemcache),
once on redis-server through ``RedisClient`` and once on a cluster of three primaries
and three replicas through ``RedisClusterClient``, and asserts the same outcome.

The redis-server is this module's own: started once on a free loopback port with
nothing kept on disk, stopped at the end. Every test uses keys of its own (a fresh
prefix), so nothing is flushed between tests. Servers of their own, again, for the
tests that SIGSTOP one. The cluster is the session's (the plugin's
``sharded_counter_redis_cluster``); its tests are skipped only when redis-server or
redis-cli is not installed.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheIllegalInputError,
    MemcacheServerError,
)
from redis.crc import key_slot
from redis.exceptions import TryAgainError

from sharded_counter.cache.by_url import redis_client_for
from sharded_counter.cache.cas import change_key
from sharded_counter.cache.client import CLIENT_ERRORS, build_client, incr_or_add
from sharded_counter.cache.guarded import GuardedClient
from sharded_counter.cache.redis.client import RedisClient
from sharded_counter.cache.redis.cluster import ClusterRefused, RedisClusterClient
from sharded_counter.cache.redis.commands import CacheCommandError
from sharded_counter.core.effects import drive
from sharded_counter.errors import CacheUnavailable
from sharded_counter.memory.backends import MemoryCache
from sharded_counter.settings import Settings
from sharded_counter_emulator import Memcached, free_port
from sharded_counter_emulator.redis_cluster import RedisCluster
from sharded_counter_emulator.redis_server import RedisServer

pytestmark = pytest.mark.backends

UINT64_MAX = 2**64 - 1
#: The servers; and every kind, with memory:// (the in-memory cache for applications'
#: tests, memory/backends.py), which has no server to refuse, stop or restart.
SERVERS = ["memcached", "redis", "redis-cluster"]
KINDS = [*SERVERS, "memory"]


@pytest.fixture(scope="module")
def redis_server(pytestconfig: pytest.Config) -> Iterator[RedisServer]:
    """This module's redis-server (``--sc-redis-server`` names another binary)."""
    server = RedisServer(binary=pytestconfig.getoption("--sc-redis-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster(request: pytest.FixtureRequest) -> RedisCluster:
    """The session's Redis Cluster (3 primaries, 3 replicas)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are not installed")
    cluster: RedisCluster = request.getfixturevalue("sharded_counter_redis_cluster")
    return cluster


def cluster_client(cluster: RedisCluster, **options: Any) -> RedisClusterClient:
    return RedisClusterClient(
        [(node.host, node.port) for node in cluster.nodes],
        connect_timeout=options.get("memcache_connect_timeout", 0.5),
        timeout=options.get("memcache_timeout", 0.5),
    )


def memcached_client(address: str, **options: Any) -> Any:
    return build_client(Settings(memcached_hosts=(address,), **options))


def redis_client(server: RedisServer, **options: Any) -> RedisClient:
    return RedisClient(
        server.host,
        server.port,
        connect_timeout=options.get("memcache_connect_timeout", 0.5),
        timeout=options.get("memcache_timeout", 0.5),
    )


@dataclass
class Cache:
    """A client of one kind of server, and fresh keys for one test."""

    kind: str
    client: Any
    prefix: str

    def key(self, name: str = "k") -> str:
        return f"{self.prefix}:{name}"


@pytest.fixture(params=KINDS)
def cache(request: pytest.FixtureRequest) -> Iterator[Cache]:
    if request.param == "memcached":
        server = request.getfixturevalue("sharded_counter_memcached")
        client = memcached_client(server.address)
    elif request.param == "redis":
        client = redis_client(request.getfixturevalue("redis_server"))
    elif request.param == "memory":
        client = MemoryCache()  # memory://, the in-memory cache for applications' tests
    else:
        client = cluster_client(request.getfixturevalue("redis_cluster"))
    try:
        yield Cache(request.param, client, f"conf-{uuid.uuid4().hex[:12]}")
    finally:
        client.close()


def token(cache: Cache, key: str) -> Any:
    value, cas = cache.client.gets(key)
    assert value is not None, f"{key} should exist"
    return cas


def eventually(check: Callable[[], bool], *, within: float) -> bool:
    """Whether ``check()`` comes true within ``within`` seconds (polled every 50 ms)."""
    deadline = time.monotonic() + within
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


# -- reads --------------------------------------------------------------------------------


def test_missing_keys_read_as_missing(cache: Cache) -> None:
    c, a, b = cache.client, cache.key("a"), cache.key("b")
    assert c.get(a) is None
    assert c.gets(a) == (None, None)
    assert c.get_many([a, b]) == {}
    assert c.gets_many([a, b]) == {}
    assert c.get_many([]) == {}
    assert c.add(a, b"1") is True
    assert c.get_many([a, b]) == {a: b"1"}
    value, cas = c.gets_many([a, b])[a]
    assert (value, cas) == c.gets(a)


@pytest.mark.parametrize(
    "value",
    [
        bytes(range(256)),
        b"",
        b"\r\nEND\r\n",
        b"7:looks:like:a:stamp",
        b"\x00" * 10,
        b"x" * 100_000,
    ],
    ids=["every-byte", "empty", "protocol-lines", "colons", "nuls", "100kB"],
)
def test_values_are_binary_safe(cache: Cache, value: bytes) -> None:
    key = cache.key()
    assert cache.client.add(key, value) is True
    assert cache.client.get(key) == value
    assert cache.client.gets(key)[0] == value
    assert cache.client.append(key, value) is True
    assert cache.client.get(key) == value + value


def test_keys_up_to_250_bytes_and_no_further(cache: Cache) -> None:
    longest = (cache.key() + "x" * 250)[:250]
    assert cache.client.add(longest, b"v") is True
    assert cache.client.get(longest) == b"v"
    assert cache.client.get_many([longest]) == {longest: b"v"}
    for bad in (longest + "x", cache.key("with space"), cache.key("tab\t"), cache.key("é")):
        with pytest.raises(MemcacheIllegalInputError):
            cache.client.get(bad)
        with pytest.raises(MemcacheIllegalInputError):
            cache.client.add(bad, b"v")


# -- cas tokens ---------------------------------------------------------------------------


def test_every_write_changes_the_cas_token(cache: Cache) -> None:
    c, key = cache.client, cache.key()
    seen = []
    assert c.add(key, b"1") is True
    seen.append(token(cache, key))
    assert c.cas(key, b"2", seen[-1]) is True
    seen.append(token(cache, key))
    assert c.append(key, b"0") is True  # 20
    seen.append(token(cache, key))
    assert c.incr(key, 5) == 25
    seen.append(token(cache, key))
    assert c.decr(key, 3) == 22
    seen.append(token(cache, key))
    assert c.delete(key) is True
    assert c.add(key, b"22") is True  # the same value again, after a delete
    seen.append(token(cache, key))
    assert len(set(seen)) == len(seen), seen
    for stale in seen[:-1]:
        assert c.cas(key, b"lost", stale) is False
    assert int(c.get(key)) == 22
    assert c.gets(key)[1] == seen[-1]  # reads do not change it
    assert all(isinstance(t, bytes) and t.isdigit() for t in seen)


def test_cas_answers_true_false_or_none(cache: Cache) -> None:
    c, key = cache.client, cache.key()
    assert c.cas(key, b"v", b"1") is None  # missing
    assert c.add(key, b"a") is True
    current = token(cache, key)
    assert c.cas(key, b"b", current) is True
    assert c.cas(key, b"c", current) is False  # another write came first
    assert c.get(key) == b"b"
    newest = token(cache, key)
    assert c.delete(key) is True
    assert c.cas(key, b"d", newest) is None  # gone since the read
    assert c.get(key) is None


def test_add_stores_only_when_absent(cache: Cache) -> None:
    c, key = cache.client, cache.key()
    assert c.add(key, b"first") is True
    assert c.add(key, b"second") is False
    assert c.get(key) == b"first"


def adders_that_won(client: Any, key: str, threads: int) -> list[int]:
    """``threads`` threads released together, each adding ``key``: who got True."""
    start = threading.Barrier(threads)
    wins: list[int] = []

    def add(i: int) -> None:
        start.wait()
        if client.add(key, str(i).encode()) is True:
            wins.append(i)

    workers = [threading.Thread(target=add, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return wins


def test_many_threads_adding_one_key_exactly_one_wins(cache: Cache) -> None:
    for round_ in range(20):
        key = cache.key(f"race{round_}")
        wins = adders_that_won(cache.client, key, 16)
        assert len(wins) == 1, (round_, wins)
        assert cache.client.get(key) == str(wins[0]).encode()


def test_the_cas_loop_loses_no_change_under_racing_threads(cache: Cache) -> None:
    """cas.change_key from 8 threads, 200 increments each: the total is exact."""
    c, key, threads, each = cache.client, cache.key(), 8, 200

    def bump(raw: bytes | None) -> tuple[None, bytes]:
        return None, str(int(raw or b"0") + 1).encode()

    def work() -> None:
        for _ in range(each):
            change_key(c, key, bump, expire=0)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert int(c.get(key)) == threads * each


# -- counters -----------------------------------------------------------------------------


def test_incr_of_a_missing_key_answers_none_and_creates_nothing(cache: Cache) -> None:
    c, key = cache.client, cache.key()
    assert c.incr(key, 1) is None
    assert c.decr(key, 1) is None
    assert c.get(key) is None
    assert drive(incr_or_add(key, 5, 0), lambda e: getattr(c, e.method)(*e.args)) == 5
    assert drive(incr_or_add(key, 5, 0), lambda e: getattr(c, e.method)(*e.args)) == 10


@pytest.mark.parametrize(
    ("start", "verb", "delta", "result"),
    [
        (b"10", "incr", 5, 15),
        (b"10", "decr", 3, 7),
        (b"10", "decr", 1, 9),  # shorter: memcached may pad it with a space
        (b"3", "decr", 5, 0),  # decr stops at 0
        (b"0", "decr", UINT64_MAX, 0),
        (str(UINT64_MAX).encode(), "incr", 1, 0),  # incr wraps at 2**64
        (str(UINT64_MAX - 1).encode(), "incr", 5, 3),
        (b"1", "incr", UINT64_MAX, 0),
        (b"99", "incr", 1, 100),
        (b"0", "incr", 0, 0),
        (b"007", "incr", 1, 8),  # leading zeros read as a number
        (b"12 ", "incr", 1, 13),  # as memcached's own padding
    ],
)
def test_incr_and_decr_are_unsigned_64_bit(
    cache: Cache, start: bytes, verb: str, delta: int, result: int
) -> None:
    c, key = cache.client, cache.key()
    assert c.add(key, start) is True
    assert getattr(c, verb)(key, delta) == result
    assert int(c.get(key)) == result  # read back, padded or not, it is that number
    assert c.incr(key, 1) == result + 1  # and it still counts


@pytest.mark.parametrize("value", [b"abc", b"", b"12abc", b"-1", str(2**64).encode(), b" ", b"1.5"])
def test_incr_of_data_that_is_no_number_is_refused(cache: Cache, value: bytes) -> None:
    c, key = cache.client, cache.key()
    assert c.add(key, value) is True
    for verb in ("incr", "decr"):
        with pytest.raises(MemcacheClientError):
            getattr(c, verb)(key, 1)
    assert c.get(key) == value


@pytest.mark.parametrize("delta", [-1, 2**64])
def test_a_delta_outside_unsigned_64_bit_is_refused(cache: Cache, delta: int) -> None:
    c, key = cache.client, cache.key()
    assert c.add(key, b"5") is True
    for verb in ("incr", "decr"):
        with pytest.raises(MemcacheClientError):
            getattr(c, verb)(key, delta)
    assert c.get(key) == b"5"


# -- append, delete, noreply --------------------------------------------------------------


def test_append_needs_the_key(cache: Cache) -> None:
    c, key = cache.client, cache.key()
    assert c.append(key, b"x") is False
    assert c.get(key) is None  # not created
    assert c.add(key, b"a") is True
    assert c.append(key, b"b") is True
    assert c.append(key, b"c") is True
    assert c.get(key) == b"abc"


def test_delete_says_whether_it_found_the_key(cache: Cache) -> None:
    c, key = cache.client, cache.key()
    assert c.delete(key) is False
    assert c.add(key, b"v") is True
    assert c.delete(key) is True
    assert c.get(key) is None


def test_noreply_calls_answer_as_pymemcache_does_and_land(cache: Cache) -> None:
    c, key = cache.client, cache.key()
    assert c.add(key, b"5", noreply=True) is True
    assert eventually(lambda: c.get(key) == b"5", within=5.0)
    assert c.incr(key, 1, noreply=True) is None
    assert eventually(lambda: c.get(key) == b"6", within=5.0)
    assert c.delete(key, noreply=True) is True
    assert eventually(lambda: c.get(key) is None, within=5.0)


# -- expiry -------------------------------------------------------------------------------


def test_expiry_times_are_read_as_memcached_reads_them(cache: Cache) -> None:
    c = cache.client
    assert c.add(cache.key("negative"), b"v", expire=-1) is True
    assert c.get(cache.key("negative")) is None  # expired at once, though stored
    assert c.add(cache.key("1970"), b"v", expire=30 * 24 * 3600 + 1) is True
    assert c.get(cache.key("1970")) is None  # above 30 days: a unix time, long past
    future = int(time.time()) + 3600
    assert c.add(cache.key("in-an-hour"), b"v", expire=future) is True
    assert c.get(cache.key("in-an-hour")) == b"v"
    assert c.add(cache.key("thirty-days"), b"v", expire=30 * 24 * 3600) is True
    assert c.get(cache.key("thirty-days")) == b"v"  # exactly 30 days: still seconds
    assert c.add(cache.key("never"), b"v", expire=0) is True
    assert c.get(cache.key("never")) == b"v"


def test_short_expiries_end_keys_and_writes_keep_or_replace_them(cache: Cache) -> None:
    """ttl 1 s on four keys; incr and append keep it, a cas with expire 0 removes it.

    memcached's clock ticks once a second, so a ttl of 1 may end a key at once: the
    keys are only read after the writes, and only their end is waited for (up to
    6 s). The key whose expiry cas removed is read once the others' expiry, however
    late, is 3 s behind (ttl 1, a tick of the clock, 1 s to spare).
    """
    c = cache.client
    counted, appended, kept, plain = (cache.key(n) for n in ("incr", "append", "cas", "plain"))
    started = time.monotonic()
    for key in (counted, appended, kept, plain):
        assert c.add(key, b"1", expire=1) is True
    c.incr(counted, 1)
    c.append(appended, b"0")
    _, cas = c.gets(kept)
    if cas is not None:  # memcached may have ended it already, or end it before the cas
        stored = c.cas(kept, b"2", cas, expire=0)
        assert stored in (True, None)
        cas = cas if stored else None
    for key in (counted, appended, plain):
        assert eventually(lambda key=key: c.get(key) is None, within=6.0), key
    time.sleep(max(0.0, started + 3.0 - time.monotonic()))
    assert cas is None or c.get(kept) == b"2"


# -- failures -----------------------------------------------------------------------------


@pytest.fixture(params=["memcached", "redis"])
def own_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    """A server of this test's own (it will be paused), and a maker of clients for it.
    The cluster has tests of its own below: a paused primary would fail over."""
    server: Any = Memcached() if request.param == "memcached" else RedisServer()
    server.start()

    def make(**options: Any) -> Any:
        if request.param == "memcached":
            return memcached_client(server.address, **options)
        return redis_client(server, **options)

    try:
        yield request.param, (server, make)
    finally:
        with contextlib.suppress(Exception):
            server.resume()
        server.stop()


def test_a_refused_connection_was_never_sent() -> None:
    port = free_port()  # nothing listens there
    for kind in SERVERS:
        client: Any = {
            "memcached": lambda: memcached_client(f"127.0.0.1:{port}"),
            "redis": lambda: RedisClient("127.0.0.1", port),
            "redis-cluster": lambda: RedisClusterClient([("127.0.0.1", port)]),
        }[kind]()
        with pytest.raises(ConnectionRefusedError) as refused:
            client.add("k", b"v")
        assert isinstance(refused.value, CLIENT_ERRORS), kind
        with pytest.raises(CacheUnavailable) as guarded:
            GuardedClient(client).add("k", b"v")
        assert guarded.value.maybe_applied is False, kind


def test_a_write_that_timed_out_may_have_landed(own_server: tuple[str, Any]) -> None:
    """The server is SIGSTOPped: a write goes out on an open connection and is not
    answered within 0.3 s. (A call that needs a new connection may instead fail
    before it is sent, while redis-py's connect waits for its handshake.)"""
    kind, (server, make) = own_server
    client = make(memcache_timeout=0.3)
    assert client.add("before", b"v") is True  # the connection the next call reuses
    server.pause()
    try:
        with pytest.raises(CacheUnavailable) as guarded:
            GuardedClient(client).add("during", b"v")
    finally:
        server.resume()
    assert guarded.value.maybe_applied is True, kind
    cause = guarded.value.__cause__
    assert isinstance(cause, TimeoutError) and isinstance(cause, CLIENT_ERRORS), kind
    assert client.get("before") == b"v"  # and it answers again
    client.close()


def test_a_redis_url_reaches_its_server_and_db(redis_server: RedisServer) -> None:
    key = f"conf-{uuid.uuid4().hex[:12]}"
    in_db_3 = redis_client_for(Settings(cache_url=f"{redis_server.url}/3"))
    in_db_0 = redis_client_for(Settings(cache_url=redis_server.url))
    assert in_db_3 is not None and in_db_0 is not None
    try:
        assert in_db_3.add(key, b"three") is True
        assert in_db_0.get(key) is None  # another db: another keyspace
        assert in_db_0.add(key, b"zero") is True
        assert (in_db_3.get(key), in_db_0.get(key)) == (b"three", b"zero")
    finally:
        in_db_3.close()
        in_db_0.close()


def test_redis_cas_tokens_keep_growing_after_a_flush(redis_server: RedisServer) -> None:
    """Redis only: memcached's cas uniques start again after a restart, ours go on from
    the clock, so a token read before a FLUSHALL never matches a key written after it."""
    client = redis_client(redis_server)
    key = f"conf-{uuid.uuid4().hex[:12]}"
    try:
        assert client.add(key, b"1") is True
        before = int(client.gets(key)[1])
        redis_server.flush_all()
        assert client.add(key, b"1") is True
        after = int(client.gets(key)[1])
        assert after > before
        assert client.cas(key, b"2", str(before)) is False
    finally:
        client.close()


def test_a_restart_while_idle_costs_no_call(own_server: tuple[str, Any]) -> None:
    """Pooled connections to a server that restarted are stale; the next calls, one
    per pooled connection and more, must each reach the new server."""
    kind, (server, make) = own_server
    client = make()
    warm = threading.Barrier(8)

    def call(i: int) -> None:
        warm.wait()
        assert client.add(f"warm{i}", b"v") is True

    workers = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    server.restart()
    for i in range(12):
        assert client.get(f"warm{i % 8}") is None, (kind, i)  # empty: nothing kept
        assert client.add(f"after{i}", b"v") is True, (kind, i)
    client.close()


def test_a_password_url_authenticates_and_a_wrong_one_is_never_sent() -> None:
    """Redis only (memcached has no AUTH here): requirepass, as on Memorystore."""
    server = RedisServer(password="s3cret/with:odd@chars").start()
    try:
        good = redis_client_for(Settings(cache_url=server.url))
        assert good is not None
        assert good.add("k", b"v") is True and good.get("k") == b"v"
        good.close()
        bad = redis_client_for(Settings(cache_url=f"redis://:wrong@{server.address}"))
        assert bad is not None
        with pytest.raises(CacheUnavailable) as refused:
            GuardedClient(bad).add("k2", b"v")
        assert refused.value.maybe_applied is False
        assert isinstance(refused.value.__cause__, ConnectionRefusedError)  # CacheNotReached
        bad.close()
        anonymous = RedisClient(server.host, server.port)
        with pytest.raises(ConnectionRefusedError):
            anonymous.get("k")  # NOAUTH: refused when the connection is made
        anonymous.close()
    finally:
        server.stop()


# -- the same random calls on both servers: the same answers ------------------------------

_NAMES = ["a", "b"]
_VALUES = [
    b"", b"0", b"9", b"10", b"100", str(UINT64_MAX).encode(), str(2**64).encode(), b"abc",
    b" 5", b"7 ", b"12\x00x", b"-0", b"-5", b"-" + str(UINT64_MAX).encode(), b"+3", b"1 2",
    b"\r\n", b"3:4", b"12abc",
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


_PLAIN_NUMBER = re.compile(rb"[0-9]+ *")


class Replay:
    """Carries out ops on one client under fresh keys, answering what each came to.

    cas tokens differ between servers, so a cas names the token it uses by when it
    was read (the latest or the oldest ``gets`` of that key), and a ``gets`` answers
    whether its token is one read before rather than the token itself.

    An incr or decr runs only on a value of digits (and the spaces memcached pads a
    number with). memcached reads the number in place with ``strtoull``, which runs
    on past a value of whitespace alone into whatever the memory after it holds: a
    value of ``"\r\n"`` read as 6744073709551615, the tail of a number stored
    before it (seen on memcached 1.6.18). That answer is the machine's, not a rule.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.prefix = f"diff-{uuid.uuid4().hex[:12]}"
        self.tokens: dict[str, list[Any]] = {name: [] for name in _NAMES}

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def run(self, op: tuple[Any, ...]) -> Any:
        try:
            return self._run(op)
        except MemcacheClientError:
            return "refused"

    def _run(self, op: tuple[Any, ...]) -> Any:
        verb, *args = op
        c = self.client
        if verb == "get_many":
            found = c.get_many([self.key(n) for n in _NAMES])
            return {k.rpartition(":")[2]: v for k, v in found.items()}
        name, *rest = args
        key = self.key(name)
        if verb == "gets":
            value, cas = c.gets(key)
            seen = cas in self.tokens[name]
            if cas is not None:
                self.tokens[name].append(cas)
            return value, seen
        if verb == "cas":
            value, which, expire = rest
            if not self.tokens[name]:
                return "no token yet"
            token = self.tokens[name][-1 if which == "latest" else 0]
            return c.cas(key, value, token, expire)
        if verb in ("get", "delete"):
            return getattr(c, verb)(key)
        if verb in ("incr", "decr"):
            value = c.get(key)
            if value is not None and not _PLAIN_NUMBER.fullmatch(value):
                return "not a plain number"
        return getattr(c, verb)(key, *rest)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.lists(st.sampled_from(_VALUES), min_size=len(_NAMES), max_size=len(_NAMES)),
    ops=st.lists(_OPS, min_size=5, max_size=40),
)
def test_random_calls_get_the_same_answers_from_both(
    start: list[bytes], ops: list[tuple[Any, ...]], memcached_and_redis: tuple[Any, ...]
) -> None:
    """Each key starts with a value (and a token read), then the calls run on memcached,
    on Redis alone and as a cluster (where the two keys are in two slots), and on the
    in-memory cache (memory://)."""
    on_memcached, *on_redis = (Replay(c) for c in memcached_and_redis)
    setup = [
        op
        for name, v in zip(_NAMES, start, strict=True)
        for op in (("add", name, v, 0), ("gets", name))
    ]
    for i, op in enumerate(setup + ops):
        expected = on_memcached.run(op)
        for replay in on_redis:
            assert replay.run(op) == expected, (i, op, type(replay.client).__name__)


@pytest.fixture(scope="module")
def memcached_and_redis(
    sharded_counter_memcached: Memcached, redis_server: RedisServer, redis_cluster: RedisCluster
) -> Iterator[tuple[Any, ...]]:
    # Time limits no loaded machine reaches: this compares answers, and a call that
    # timed out on one server and not the others would be a difference of the machine's.
    patient = {"memcache_timeout": 10.0, "memcache_connect_timeout": 10.0}
    clients = (
        memcached_client(sharded_counter_memcached.address, **patient),
        redis_client(redis_server, **patient),
        cluster_client(redis_cluster, **patient),
        MemoryCache(),
    )
    yield clients
    for client in clients:
        client.close()


def test_a_value_over_memcacheds_item_size_is_one_known_difference(cache: Cache) -> None:
    """memcached refuses an item over its size limit (1 MB by default), and so does the
    in-memory cache; Redis stores it. docs/cache-backends.md lists this among the
    differences."""
    big = b"x" * (2 * 1024 * 1024)
    if cache.kind in ("memcached", "memory"):
        with pytest.raises(MemcacheServerError):
            cache.client.add(cache.key(), big)
        assert cache.client.get(cache.key()) is None
    else:
        assert cache.client.add(cache.key(), big) is True
        assert cache.client.get(cache.key()) == big


@pytest.mark.parametrize(
    "foreign", [b"plain", b"", b"12", b"0:x", b"007:x", b"x:1", b"1" * 20 + b":x"]
)
def test_a_value_another_redis_client_set_is_data_with_token_zero(
    redis_server: RedisServer, foreign: bytes
) -> None:
    """Redis only: a plain ``SET`` from another client (no cas unique of ours in front)
    reads as data, as anything at a memcached key does, and our next write replaces
    it. docs/cache-backends.md says so."""
    import redis

    other = redis.Redis(host=redis_server.host, port=redis_server.port)
    client = redis_client(redis_server)
    key = f"conf-{uuid.uuid4().hex[:12]}"
    try:
        other.set(key, foreign)
        assert client.get(key) == foreign
        assert client.gets(key) == (foreign, b"0")
        assert client.append(key, b"+") is True
        assert client.get(key) == foreign + b"+"
        other.set(key, foreign)
        assert client.cas(key, b"mine", b"0") is True
        data, unique = client.gets(key)
        assert data == b"mine" and int(unique) > 0
        other.set(key, b"41")
        assert client.incr(key, 1) == 42
        listed = f"{key}-list"
        other.rpush(listed, b"x")  # another type than a string: missing to reads,
        assert client.get(listed) is None  # and every write refused
        for write in (
            lambda: client.add(listed, b"v"),
            lambda: client.append(listed, b"v"),
            lambda: client.cas(listed, b"v", b"0"),
            lambda: client.incr(listed, 1),
        ):
            with pytest.raises(CacheCommandError, match="WRONGTYPE"):
                write()
        assert other.lrange(listed, 0, -1) == [b"x"]
    finally:
        other.close()
        client.close()


# -- the cluster's own: slots, redirects, a stalled primary -------------------------------


def test_one_get_many_reads_keys_of_many_slots_on_every_primary(
    redis_cluster: RedisCluster,
) -> None:
    client = cluster_client(redis_cluster)
    prefix = f"slots-{uuid.uuid4().hex[:12]}"
    keys = [f"{prefix}:{i}" for i in range(300)]
    try:
        for i, key in enumerate(keys):
            assert client.add(key, str(i).encode()) is True
        slots = {key_slot(key.encode()) for key in keys}
        assert int(redis_cluster.slot_of(keys[0])) == key_slot(keys[0].encode())
        views = redis_cluster.views(redis_cluster.primaries()[0])
        holders = {v.address for v in views if v.primary and any(v.holds(s) for s in slots)}
        assert len(slots) > 250 and len(holders) == 3, (len(slots), holders)

        missing = f"{prefix}:missing"
        found = client.get_many([*keys, missing])
        assert found == {key: str(i).encode() for i, key in enumerate(keys)}
        tokens = client.gets_many(keys)
        assert [client.cas(key, b"new", tokens[key][1]) for key in keys[:20]] == [True] * 20
        assert client.get_many(keys[:20]) == dict.fromkeys(keys[:20], b"new")
    finally:
        client.close()


def _node_id(cluster: RedisCluster, node: RedisServer) -> str:
    return cluster.command(node, "CLUSTER", "MYID").strip()


def test_a_slot_moved_away_is_followed_through_ask_and_moved_and_runs_once(
    redis_cluster: RedisCluster,
) -> None:
    """The slot of a key is moved to another primary while the client holds the old
    map, as ``redis-cli --cluster reshard`` moves it: while the move is under way the
    old primary answers ASK, after it MOVED. Each call follows and runs once."""
    client = cluster_client(redis_cluster)
    key = f"moved-{uuid.uuid4().hex[:12]}"
    source = redis_cluster.primary_for(key)
    target = next(n for n in redis_cluster.primaries() if n is not source)
    slot = str(redis_cluster.slot_of(key))
    source_id, target_id = _node_id(redis_cluster, source), _node_id(redis_cluster, target)
    try:
        assert client.get(key) is None  # the client's map: the slot is at the source
        redis_cluster.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        redis_cluster.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        assert client.add(key, b"5") is True  # ASK: made on the target
        assert client.incr(key, 1) == 6  # ASK again
        for node in (target, source):
            redis_cluster.command(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        assert client.incr(key, 1) == 7  # MOVED, then the target
        assert client.get(key) == b"7"
        assert redis_cluster.command(target, "GET", key).strip().endswith(":7")
    finally:
        client.close()


def test_a_read_of_a_slot_half_moved_is_refused_as_never_run(
    redis_cluster: RedisCluster,
) -> None:
    """While a slot is being moved, a multi-key read finding only some of its keys at
    the old primary gets ``TRYAGAIN``: ``ClusterRefused``, nothing ran. (The hash tag
    puts both keys in one slot, as one ``MGET`` needs; the library's keys need none.)"""
    client = cluster_client(redis_cluster)
    tag = "{" + uuid.uuid4().hex[:12] + "}"
    here, missing = f"{tag}:here", f"{tag}:missing"
    source = redis_cluster.primary_for(here)
    target = next(n for n in redis_cluster.primaries() if n is not source)
    slot = str(redis_cluster.slot_of(here))
    source_id, target_id = _node_id(redis_cluster, source), _node_id(redis_cluster, target)
    try:
        assert client.add(here, b"1") is True
        redis_cluster.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        redis_cluster.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        with pytest.raises(ClusterRefused) as refused:
            client.get_many([here, missing])
        assert refused.value.maybe_applied is False
        assert isinstance(refused.value.__cause__, TryAgainError)
    finally:
        for node in (target, source):  # the move called off: the slot stays at the source
            redis_cluster.command(node, "CLUSTER", "SETSLOT", slot, "STABLE")
        client.close()
    assert client.get_many([here, missing]) == {here: b"1"}


@pytest.fixture(scope="module")
def slow_to_fail_over() -> Iterator[RedisCluster]:
    """A cluster of this module's own whose primaries may be paused: with a node
    timeout of 60 s, no replica takes over while one is."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are not installed")
    cluster = RedisCluster(node_timeout_ms=60_000).start()
    try:
        yield cluster
    finally:
        for node in cluster.nodes:
            with contextlib.suppress(Exception):
                node.resume()
        cluster.stop()


def test_a_cluster_write_that_timed_out_may_have_landed_and_is_never_resent(
    slow_to_fail_over: RedisCluster,
) -> None:
    """The key's primary is SIGSTOPped: an ``incr`` goes out and is not answered within
    0.3 s. It is not sent again (redis-py's cluster client would resend it on a new
    connection): once the primary runs again the counter went up once at most."""
    cluster = slow_to_fail_over
    client = cluster_client(cluster, memcache_timeout=0.3)
    key = f"stalled-{uuid.uuid4().hex[:12]}"
    assert client.add(key, b"0") is True  # the connection the next call reuses
    primary = cluster.primary_for(key)
    primary.pause()
    try:
        with pytest.raises(CacheUnavailable) as guarded:
            GuardedClient(client).call("incr", key, 1)
    finally:
        primary.resume()
    assert guarded.value.maybe_applied is True
    assert isinstance(guarded.value.__cause__, TimeoutError)
    value = client.get(key)
    assert value in (b"0", b"1"), value  # ran once or not at all, never twice
    assert client.incr(key, 1) == int(value) + 1  # and it answers again
    client.close()
