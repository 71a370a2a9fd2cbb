"""Several memcached servers as one cache (``cache/memcached/cluster.py``), on three real memcached
processes.

Each test starts its own three servers, so that every test sees fresh client
state: the client cache of ``paths/backend.py`` is keyed by the server addresses.
Servers are killed (SIGKILL, as a crash), paused (SIGSTOP: connections hang) and
brought back on the same port, exactly as an outage would.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient

from sharded_counter import Counter, who_holds
from sharded_counter.cache.client import build_client, key_digest
from sharded_counter.cache.memcached import DEAD_TIMEOUT
from sharded_counter.cache.memcached.cluster import (
    RECORD_KEY,
    STASH_KEY,
    ClusterClient,
    ServerUnavailable,
)
from sharded_counter.cache.tier import CacheTier
from sharded_counter.core.keys import cache_keys
from sharded_counter.patterns.lock import lock_key
from sharded_counter.settings import Settings
from sharded_counter_emulator import Memcached

TIMEOUT = 0.3


def cluster(servers: list[Memcached], dead_timeout: float = 1.0) -> ClusterClient:
    return ClusterClient(
        [(s.host, s.port) for s in servers],
        connect_timeout=TIMEOUT,
        timeout=TIMEOUT,
        dead_timeout=dead_timeout,
    )


def direct(server: Memcached) -> Client:
    """A plain client of one server, to see what it really holds."""
    return Client((server.host, server.port), timeout=2, default_noreply=False)


def by_address(servers: list[Memcached], address: str | None) -> Memcached:
    return next(s for s in servers if s.address == address)


def wait_until_all_up(client: ClusterClient, timeout: float = 30.0) -> float:
    """Keep calling (a call is what schedules a rejoin) until every server is up again."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(ServerUnavailable):  # while its server is still out
            client.get("poke")
        if set(client.server_states().values()) == {"up"}:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"servers did not all rejoin: {client.server_states()}")


def keys_homed_at(client: ClusterClient, address: str, make: Callable[[int], str]) -> list[str]:
    return [k for k in (make(i) for i in range(400)) if client.server_for(k) == address][:5]


def record_key(i: int) -> str:
    return cache_keys("sc", "test-scope", f"counter {i}")[0]


def stash_key(i: int) -> str:
    return cache_keys("sc", "test-scope", f"counter {i}")[1]


def running_threads(server: Memcached) -> list[str]:
    """The server's threads that are not stopped, as "tid:state" (from /proc)."""
    pid = server.pgid
    assert pid is not None
    running = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        state = stat[stat.rfind(")") + 2]
        if state not in "TtZX":
            running.append(f"{task.name}:{state}")
    return running


# -- the harness: what a paused server is ----------------------------------------------


def test_a_paused_server_has_stopped_when_pause_returns(trio: list[Memcached]) -> None:
    """Every pause test here expects silence from the first call after ``pause()``.

    SIGSTOP is acted on by one thread per process; memcached's worker threads go on
    answering until that thread gets a CPU and stops them (on a loaded machine, long
    enough for a test's calls to be answered by a "paused" server). So ``pause()``
    waits until every thread has stopped. Without that wait, most of these rounds
    find a worker still running, even on an idle machine, while a client keeps the
    workers busy.
    """
    server = trio[0]
    done = threading.Event()

    def keep_busy() -> None:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            while not done.is_set():
                sock.sendall(b"version\r\n" * 16)
                replies = b""
                while replies.count(b"\r\n") < 16:
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        return
                    replies += chunk

    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        time.sleep(0.1)
        for _ in range(20):
            server.pause()
            try:
                assert running_threads(server) == []
            finally:
                server.resume()
    finally:
        done.set()
        busy.join()
    server.pause()
    try:
        with pytest.raises(TimeoutError):
            Client((server.host, server.port), timeout=TIMEOUT).version()
    finally:
        server.resume()
    assert direct(server).version()


# -- key shapes ----------------------------------------------------------------------


@given(
    prefix=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64),
    scope=st.text(max_size=40),
    name=st.text(min_size=1, max_size=40),
)
def test_the_cluster_recognizes_every_counter_key_keys_py_makes(
    prefix: str, scope: str, name: str
) -> None:
    record, stash = cache_keys(prefix, scope, name)
    assert RECORD_KEY.fullmatch(record)
    assert STASH_KEY.fullmatch(stash)
    assert not RECORD_KEY.fullmatch(stash)
    assert not STASH_KEY.fullmatch(record)
    # Rate-limit windows, time-series buckets and locks are never taken for records.
    digest = key_digest(name)
    for other in (
        f"{prefix}:rl:60:{digest}:28000000",
        f"{prefix}:ts:60:28000000:{digest}",
        lock_key(prefix, name),
    ):
        assert not RECORD_KEY.fullmatch(other)
        assert not STASH_KEY.fullmatch(other)


def test_build_client_makes_a_cluster_for_several_hosts(trio: list[Memcached]) -> None:
    one = build_client(Settings(memcached_hosts=(trio[0].address,)))
    several = build_client(Settings(memcached_hosts=tuple(s.address for s in trio)))
    assert not isinstance(one, ClusterClient)
    assert isinstance(several, ClusterClient)
    assert several.servers == tuple(s.address for s in trio)
    assert several.dead_timeout == DEAD_TIMEOUT


# -- spreading and failing over ------------------------------------------------------------


def test_keys_spread_evenly_and_each_lives_only_on_its_server(trio: list[Memcached]) -> None:
    client = cluster(trio)
    keys = [f"spread:{i}" for i in range(3000)]
    for key in keys:
        client.set(key, key.encode())
    held = {s.address: int(direct(s).stats()[b"curr_items"]) for s in trio}
    assert sum(held.values()) == 3000
    assert all(800 <= n <= 1200 for n in held.values()), held  # about a third each
    homes = Tally(client.server_for(k) for k in keys)
    assert homes == Tally(held)
    for key in random.Random(7).sample(keys, 100):
        for server in trio:
            on_it = direct(server).get(key)
            assert (on_it is not None) == (server.address == client.server_for(key))


def test_a_killed_server_costs_no_exception_and_its_keys_move(trio: list[Memcached]) -> None:
    client = cluster(trio)
    keys = [f"k:{i}" for i in range(600)]
    for key in keys:
        client.set(key, b"1")
    victim = by_address(trio, client.server_for(keys[0]))
    on_victim = {k for k in keys if client.server_for(k) == victim.address}
    assert 100 < len(on_victim) < 300
    victim.kill()
    # Every read and write goes on without an exception: the dead server's keys
    # are misses at first, then live on the other two.
    found = client.get_many(keys)
    assert set(found) == set(keys) - on_victim
    assert client.server_states()[victim.address] == "down"
    for key in keys:
        assert client.set(key, b"2") is True
        assert client.get(key) == b"2"
        assert client.server_for(key) != victim.address
    assert client.incr(keys[0], 5) == 7
    assert client.add("fresh", b"x") is True


def test_every_server_down_raises_fast_then_comes_back(trio: list[Memcached]) -> None:
    client = cluster(trio, dead_timeout=0.5)
    for server in trio:
        server.kill()
    # The first call finds its server dead; purging the others finds them dead too.
    with pytest.raises(ServerUnavailable):
        client.get("any")
    assert set(client.server_states().values()) == {"down"}
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="every memcached server is down"):
        client.get("any")
    assert time.monotonic() - started < 0.05  # skipped, not waited on
    for server in trio:
        server.start()
    wait_until_all_up(client)
    assert client.set("back", b"1") is True


def test_a_write_that_timed_out_is_not_repeated_elsewhere(trio: list[Memcached]) -> None:
    client = cluster(trio)
    victim = trio[0]
    key = keys_homed_at(client, victim.address, lambda i: f"w:{i}")[0]
    victim.pause()
    # A paused server applies the add when it resumes: repeating it on another
    # server could store it twice, so the timeout is the caller's to see.
    with pytest.raises(TimeoutError):
        client.add(key, b"once")
    assert client.server_states()[victim.address] == "down"
    assert client.get(key) is None  # read from its new home: the add did not go there
    victim.resume()
    # It sat unanswered in the paused server's socket and lands now.
    deadline = time.monotonic() + 5
    while direct(victim).get(key) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert direct(victim).get(key) == b"once"


def test_a_cas_token_is_refused_once_its_key_has_moved(trio: list[Memcached]) -> None:
    client = cluster(trio)
    victim = trio[1]
    key = keys_homed_at(client, victim.address, lambda i: f"cas:{i}")[0]
    client.set(key, b"v1")
    _, token = client.gets(key)
    victim.kill()
    client.get(key)  # notices the death: the key moves
    stand_in = by_address(trio, client.server_for(key))
    # Give the stand-in's copy the very cas number the dead server handed out
    # (cas numbers count stores per server), as can happen by chance.
    for _ in range(5000):
        direct(stand_in).set(key, b"other")
        if direct(stand_in).gets(key)[1] == token.value:
            break
    assert direct(stand_in).gets(key)[1] == token.value
    assert client.cas(key, b"from a stale read", token) is False
    assert direct(stand_in).get(key) == b"other"
    _, fresh = client.gets(key)
    assert client.cas(key, b"v2", fresh) is True


def test_a_stash_is_not_deleted_while_its_home_is_away(trio: list[Memcached]) -> None:
    client = cluster(trio)
    victim = trio[2]
    stash = keys_homed_at(client, victim.address, stash_key)[0]
    record = keys_homed_at(client, victim.address, record_key)[0]
    client.set(stash, b"7")
    victim.pause()
    client.get(record)  # times out: the server leaves
    # Deleting here would leave the paused server's stash to come back later.
    with pytest.raises(ServerUnavailable, match="would bring it back"):
        client.delete(stash)
    assert client.delete(record) is False  # a record may go: the home purges its own
    victim.resume()
    assert direct(victim).get(stash) == b"7"


# -- cleaning a server before it serves again --------------------------------------------------


@pytest.mark.parametrize("outage", ["restart", "pause"])
def test_a_returning_server_loses_its_records_and_gets_its_stashes_back(
    trio: list[Memcached], outage: str
) -> None:
    client = cluster(trio)
    victim = trio[0]
    records = keys_homed_at(client, victim.address, record_key)
    stashes = keys_homed_at(client, victim.address, stash_key)
    other = keys_homed_at(client, trio[1].address, lambda i: f"plain:{i}")
    for key in records:
        client.set(key, b"complete record from before the outage")
    tier = CacheTier(client, ttl=60)
    for key in stashes:
        tier.stash(key, 4)
    client.set(other[0], b"untouched")

    # The server leaves inside the first stash below, and is probed no sooner than
    # dead_timeout after that. Only a time taken before the leave bounds the wait:
    # one taken after it would also count however long the calls in between took
    # (on a busy machine, more than the 0.3 s drain that otherwise makes up for them).
    outage_began = time.monotonic()
    if outage == "restart":
        victim.kill()
    else:
        victim.pause()
    for key in stashes:
        tier.stash(key, 10)  # acknowledged on a stand-in while the home is away
    for key in records:
        client.set(key, b"record made on a stand-in")
    assert client.server_states()[victim.address] == "down"
    if outage == "restart":
        victim.start()
    else:
        victim.resume()
    wait_until_all_up(client)
    assert time.monotonic() - outage_began >= 1.0  # left alone for dead_timeout first

    expected_stash = 14 if outage == "pause" else 10  # a restart lost the first 4
    for key in stashes:
        assert tier.peek_stash(key) == expected_stash
        assert direct(victim).get(key) == str(expected_stash).encode()
        for stand_in in trio[1:]:  # nothing left behind, nothing counted twice
            assert int(direct(stand_in).get(key) or b"0") == 0
    for key in records:
        assert client.get(key) is None  # stale on the home, orphaned on the stand-in
        for server in trio:
            assert direct(server).get(key) is None
    assert client.get(other[0]) == b"untouched"  # only counter records are purged


def test_a_stand_in_drops_leftover_records_before_it_takes_keys(trio: list[Memcached]) -> None:
    client = cluster(trio)
    victim = trio[0]
    record = keys_homed_at(client, victim.address, record_key)[0]
    # Left over on every other server from some earlier outage: it missed later writes.
    for server in trio[1:]:
        direct(server).set(record, b"stale complete record")
    victim.kill()
    client.get(record)  # the server leaves, and the stand-ins are purged first
    assert client.get(record) is None
    for server in trio[1:]:
        assert direct(server).get(record) is None


# -- counters on the cluster, end to end --------------------------------------------------------


def cluster_of(counter: Counter) -> ClusterClient:
    # The client paths/backend.py built for these settings; reached this way only to
    # watch its servers' states.
    client = counter._backend.cache._client
    assert isinstance(client, ClusterClient)
    return client


class Load:
    """Threads incrementing and reading a set of counters, tallying what was acknowledged."""

    def __init__(self, counters: list[Counter], threads: int = 8) -> None:
        self.counters = counters
        self.acknowledged = Tally[str]()
        self.errors: list[BaseException] = []
        self.reads = 0
        self._busy = 0
        self._lock = threading.Condition()
        self._running = threading.Event()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(i,)) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _work(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            with self._lock:
                if not self._running.is_set():
                    self._lock.wait(0.05)
                    continue
                self._busy += 1
            try:
                self._step(rng)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._lock.notify_all()

    def _step(self, rng: random.Random) -> None:
        counter = rng.choice(self.counters)
        try:
            counter.increment(1)
            with self._lock:
                self.acknowledged[counter.name] += 1
            if rng.random() < 0.3:
                counter.get_count()
                with self._lock:
                    self.reads += 1
        except BaseException as exc:
            with self._lock:
                self.errors.append(exc)

    def run(self, seconds: float) -> None:
        with self._lock:
            self._running.set()
            self._lock.notify_all()
        time.sleep(seconds)

    def pause(self) -> None:
        """Stop starting calls, and wait for those in flight to finish."""
        with self._lock:
            self._running.clear()
            assert self._lock.wait_for(lambda: self._busy == 0, timeout=60)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def assert_exact(self) -> None:
        assert self.errors == []
        for counter in self.counters:
            truth = counter.get_count(nocache=True)
            assert truth == self.acknowledged[counter.name], counter.name
            assert counter.count == truth, counter.name


@pytest.mark.parametrize("outage", ["restart", "pause"])
def test_counters_stay_exact_while_a_server_dies_and_returns(
    sharded_counter_env: dict[str, str], trio: list[Memcached], outage: str
) -> None:
    hosts = [s.address for s in trio]
    counters = [
        Counter(f"hot {i}", memcached_hosts=hosts, memcache_timeout=TIMEOUT) for i in range(12)
    ]
    client = cluster_of(counters[0])
    homes = Tally(client.server_for(c._record_key) for c in counters)
    victim = by_address(trio, homes.most_common(1)[0][0])
    assert homes[victim.address] >= 2  # the outage hits counters cached there

    load = Load(counters)
    try:
        load.run(1.5)
        if outage == "restart":
            victim.kill()
        else:
            victim.pause()
        load.run(2.0)
        load.pause()
        assert client.server_states()[victim.address] == "down"
        load.assert_exact()  # on two servers

        if outage == "restart":
            victim.start()
        else:
            victim.resume()
        load.run(0.5)
        rejoined_after = wait_until_all_up(client)  # rejoins while the load runs
        load.run(1.5)
        load.pause()
    finally:
        load.stop()
    load.assert_exact()  # on all three again
    # One line of measurements for the run's report (visible with -s).
    print(
        f"\ncluster {outage}: acknowledged={sum(load.acknowledged.values())} "
        f"reads={load.reads} errors={len(load.errors)} counters_on_victim="
        f"{homes[victim.address]}/12 rejoin_wait={rejoined_after:.2f}s"
    )
    assert sum(load.acknowledged.values()) > 100
    assert load.reads > 20
    # The returning server serves again: counters homed there are cached on it.
    assert direct(victim).stats()[b"curr_items"] > 0


@pytest.mark.parametrize("sharded_counter_engine", ["classic"], indirect=True)
def test_the_plain_hash_client_would_serve_a_stale_total(
    sharded_counter_env: dict[str, str], trio: list[Memcached]
) -> None:
    """The control: the same outage through pymemcache's own HashClient goes wrong.

    While it has dropped a server, writes merge elsewhere; when it adds the
    server back, the complete record there, missing those writes, is trusted.
    The ClusterClient purges it first.
    """
    servers = [(s.host, s.port) for s in trio]
    plain = HashClient(
        servers,
        use_pooling=True,
        connect_timeout=TIMEOUT,
        timeout=TIMEOUT,
        retry_attempts=1,
        dead_timeout=1,
        default_noreply=False,
    )
    ours = cluster(trio)

    def plain_dropped(victim: Memcached) -> bool:
        return (victim.host, victim.port) in plain._dead_clients

    def ours_dropped(victim: Memcached) -> bool:
        return ours.server_states()[victim.address] == "down"

    results = {}
    for label, client, dropped in (
        ("plain", plain, plain_dropped),
        ("cluster", ours, ours_dropped),
    ):
        for server in trio:
            server.flush_all()
        counter = Counter(f"control {label}", memcache_client=client)
        counter.increment(5)
        assert counter.count == 5  # a complete record is cached
        home = getattr(client, "server_for", None) or client.hasher.get_node
        victim = by_address(trio, home(counter._record_key))
        victim.pause()
        deadline = time.monotonic() + 15
        while not dropped(victim) and time.monotonic() < deadline:
            counter.get_count()
            time.sleep(0.1)
        for _ in range(3):
            counter.increment(1)  # merged elsewhere, or nowhere
        victim.resume()
        time.sleep(2.5)  # past both clients' dead_timeout
        for _ in range(5):
            counter.get_count()  # brings the server back into rotation
            time.sleep(0.2)
        results[label] = (counter.count, counter.get_count(nocache=True))
    print(f"\ncontrol (count, shard sum): {results}")
    assert results["plain"] == (5, 8)  # stale: the hazard is real
    assert results["cluster"] == (8, 8)


# -- the docs' examples ---------------------------------------------------------------------------

PAGE = Path(__file__).resolve().parent.parent / "docs" / "cache-tier.md"
TITLE = "# The cache tier: rate limits, time series, locks, clusters"


def docs_examples() -> dict[str, list[str]]:
    """The python blocks of each ``##`` part of the docs' cache-tier page."""
    section = PAGE.read_text(encoding="utf-8").split(TITLE, 1)[1].split("\n# ", 1)[0]
    parts = re.split(r"^## (.+)$", section, flags=re.MULTILINE)
    return {
        title.strip(): re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)
        for title, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def run_example(source: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(source, str(PAGE), "exec"), namespace)
    return namespace


def test_the_docs_have_an_example_for_each_part() -> None:
    examples = docs_examples()
    assert set(examples) == {"Rate limits", "Time series", "Locks", "Several memcached servers"}
    assert all(examples.values())


def test_the_docs_cache_examples_run(
    sharded_counter_memcached: Memcached, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMCACHED_HOSTS", sharded_counter_memcached.address)
    sharded_counter_memcached.flush_all()
    examples = docs_examples()

    limits = run_example(examples["Rate limits"][0])
    assert limits["decision"].allowed
    assert limits["decision"].remaining == 19
    assert limits["per_user"].test("user:42").remaining == 13  # 1 + 5 + the export

    series = run_example(examples["Time series"][0])
    assert series["total"] == 6
    assert sum(count for _, count in series["per_minute"]) == 6

    locks = run_example(examples["Locks"][0])
    assert locks["lease"].expires_at is None  # released on the way out
    assert who_holds("nightly-report") is None


@pytest.mark.memcached_only  # the docs' example of several memcached servers
def test_the_docs_durable_and_cluster_examples_run(
    sharded_counter_env: dict[str, str], trio: list[Memcached], monkeypatch: pytest.MonkeyPatch
) -> None:
    examples = docs_examples()
    durable = run_example(examples["Time series"][1])
    assert durable["moved"] == 6

    monkeypatch.setenv("MEMCACHED_HOSTS", " ".join(s.address for s in trio))
    counted = run_example(examples["Several memcached servers"][0])
    assert counted["hits"].count == 1
    assert isinstance(cluster_of(counted["hits"]), ClusterClient)
