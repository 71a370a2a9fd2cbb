"""Several memcached servers under asyncio (``aio/routing.py``), on three real memcached
processes: the blocking cluster's failover rules, kept by the asyncio shell.

As in test_cluster.py, servers are killed (SIGKILL), paused (SIGSTOP) and brought
back on the same port. The last test counts from tasks and from threads at once
through an outage: the blocking ``ClusterClient`` and the asyncio ``ServerRing``
each keep their own picture of the servers, as two processes would.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter as Tally
from collections.abc import Callable

import pytest
from test_aio import run
from test_cluster import (
    TIMEOUT,
    Load,
    by_address,
    cluster,
    cluster_of,
    direct,
    record_key,
    stash_key,
    wait_until_all_up,
)

from sharded_counter import Counter
from sharded_counter.aio import AsyncCounter
from sharded_counter.aio.backend import async_backend_for
from sharded_counter.aio.memcache import AsyncMemcache
from sharded_counter.aio.routing import ServerRing
from sharded_counter.aio.shell import drive, on_memcache
from sharded_counter.cache.backlog import Backlog
from sharded_counter.cache.sightings import StashSightings
from sharded_counter.cache.stashes import PendingStashes
from sharded_counter.errors import CacheUnavailable
from sharded_counter.settings import parse_host, resolve
from sharded_counter_emulator import Memcached

# Every test here looks at memcached itself: its own failover cluster of three servers.
pytestmark = [pytest.mark.backends, pytest.mark.memcached_only]


def memcache_of(servers: list[Memcached]) -> tuple[AsyncMemcache, ServerRing]:
    hosts = [s.address for s in servers]
    settings = resolve(
        {
            "memcached_hosts": hosts,
            "memcache_timeout": TIMEOUT,
            "memcache_connect_timeout": TIMEOUT,
        },
        {},
    )
    memcache = AsyncMemcache(settings, outage=None)
    assert isinstance(memcache.router, ServerRing)  # what several servers get
    # As test_cluster.py's clients: a failed server is probed after 1 s, not 5.
    memcache.router = ring = ServerRing([parse_host(h) for h in hosts], settings, dead_timeout=1.0)
    return memcache, ring


def homed_at(ring: ServerRing, address: str, make: Callable[[int], str]) -> list[str]:
    return [k for k in (make(i) for i in range(400)) if ring.server_for(k) == address][:5]


async def all_up(memcache: AsyncMemcache, ring: ServerRing, timeout: float = 30.0) -> float:
    """Keep calling (a call is what schedules a rejoin) until every server is up again."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(CacheUnavailable):  # while its server is still out
            await memcache.get("poke")
        if set(ring.server_states().values()) == {"up"}:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"servers did not all rejoin: {ring.server_states()}")


# -- routing and failing over ---------------------------------------------------------------


def test_keys_live_where_the_blocking_cluster_puts_them(trio: list[Memcached]) -> None:
    async def main() -> None:
        memcache, ring = memcache_of(trio)
        client = cluster(trio)
        keys = [f"spread:{i}" for i in range(300)]
        for key in keys:
            assert await memcache.add(key, b"1") is True
        assert Tally(ring.server_for(k) for k in keys).keys() == {s.address for s in trio}
        for key in keys:
            assert ring.server_for(key) == client.server_for(key)
            assert direct(by_address(trio, ring.server_for(key))).get(key) == b"1"

    run(main)


def test_a_killed_server_costs_reads_nothing_and_its_keys_move(trio: list[Memcached]) -> None:
    async def main() -> None:
        memcache, ring = memcache_of(trio)
        keys = [f"k:{i}" for i in range(300)]
        for key in keys:
            await memcache.add(key, b"1")
        victim = by_address(trio, ring.server_for(keys[0]))
        on_victim = {k for k in keys if ring.server_for(k) == victim.address}
        assert 50 < len(on_victim) < 150
        victim.kill()
        # The dead server's keys are read again at their new homes: misses, no error.
        found = await memcache.get_many(keys)
        assert set(found) == set(keys) - on_victim
        assert ring.server_states()[victim.address] == "down"
        for key in sorted(on_victim)[:20]:
            assert ring.server_for(key) != victim.address
            assert await memcache.add(key, b"2") is True
            assert await memcache.get(key) == b"2"

    run(main)


def test_a_write_that_timed_out_is_not_repeated_elsewhere(trio: list[Memcached]) -> None:
    async def main() -> None:
        memcache, ring = memcache_of(trio)
        victim = trio[0]
        key = homed_at(ring, victim.address, lambda i: f"w:{i}")[0]
        await memcache.get(key)  # a connection to it exists before it stops
        victim.pause()
        # A paused server applies the add when it resumes; a dead one looks just the
        # same to emcache (both time out). Repeating it elsewhere could store it twice.
        with pytest.raises(CacheUnavailable) as failed:
            await memcache.add(key, b"once")
        assert failed.value.maybe_applied
        assert ring.server_states()[victim.address] == "down"
        assert await memcache.get(key) is None  # its new home: the add did not go there
        victim.resume()
        deadline = time.monotonic() + 5
        while direct(victim).get(key) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert direct(victim).get(key) == b"once"

    run(main)


def test_a_cas_token_is_refused_once_its_key_has_moved(trio: list[Memcached]) -> None:
    async def main() -> None:
        memcache, ring = memcache_of(trio)
        victim = trio[1]
        key = homed_at(ring, victim.address, lambda i: f"cas:{i}")[0]
        await memcache.add(key, b"v1")
        _, token = await memcache.gets(key)
        victim.kill()
        await memcache.get(key)  # notices the death: the key moves
        stand_in = by_address(trio, ring.server_for(key))
        # The stand-in's copy gets the very cas number the dead server handed out
        # (cas numbers count stores per server), as can happen by chance. (emcache
        # reads them as ints, pymemcache as bytes.)
        for _ in range(5000):
            direct(stand_in).set(key, b"other")
            if int(direct(stand_in).gets(key)[1]) == token.value:
                break
        assert int(direct(stand_in).gets(key)[1]) == token.value
        assert await memcache.cas(key, b"from a stale read", token) is False
        assert direct(stand_in).get(key) == b"other"
        _, fresh = await memcache.gets(key)
        assert await memcache.cas(key, b"v2", fresh) is True
        assert direct(stand_in).get(key) == b"v2"

    run(main)


def test_a_stash_is_not_deleted_while_its_home_is_away(trio: list[Memcached]) -> None:
    async def main() -> None:
        memcache, ring = memcache_of(trio)
        victim = trio[2]
        stash = homed_at(ring, victim.address, stash_key)[0]
        record = homed_at(ring, victim.address, record_key)[0]
        await memcache.add(stash, b"7")
        victim.pause()
        # Times out: the server leaves, and the read is made at the key's new home.
        assert await memcache.get(record) is None
        assert ring.server_states()[victim.address] == "down"
        with pytest.raises(CacheUnavailable, match="would bring it back") as refused:
            await memcache.delete(stash)
        assert not refused.value.maybe_applied
        await memcache.delete(record)  # a record may go: its home purges its own
        victim.resume()
        assert direct(victim).get(stash) == b"7"

    run(main)


# -- cleaning a server before it serves again: the blocking cluster's Membership -------------


@pytest.mark.parametrize("outage", ["restart", "pause"])
def test_a_returning_server_loses_its_records_and_gets_its_stashes_back(
    trio: list[Memcached], outage: str
) -> None:
    stashes_steps = PendingStashes(Backlog(), StashSightings())

    async def main() -> None:
        memcache, ring = memcache_of(trio)
        perform = on_memcache(memcache)
        victim = trio[0]
        records = homed_at(ring, victim.address, record_key)
        stashes = homed_at(ring, victim.address, stash_key)
        for key in records:
            await memcache.add(key, b"complete record from before the outage")
        for key in stashes:
            await drive(stashes_steps.stash(key, 4), perform)

        outage_began = time.monotonic()  # before the leave: see test_cluster.py
        if outage == "restart":
            victim.kill()
        else:
            victim.pause()
        # Fails (killed or paused: a timeout either way): the server leaves, and the
        # read is made at the key's new home, a stand-in, which holds nothing for it.
        assert await memcache.get(records[0]) is None
        for key in stashes:
            await drive(stashes_steps.stash(key, 10), perform)  # acknowledged on a stand-in
        for key in records:
            await memcache.add(key, b"record made on a stand-in")
        assert ring.server_states()[victim.address] == "down"
        if outage == "restart":
            victim.start()
        else:
            victim.resume()
        await all_up(memcache, ring)
        assert time.monotonic() - outage_began >= 1.0  # left alone for dead_timeout first

        expected = 14 if outage == "pause" else 10  # a restart lost the first 4
        for key in stashes:
            assert await drive(stashes_steps.peek_stash(key), perform) == expected
            for stand_in in trio[1:]:  # nothing left behind, nothing counted twice
                assert int(direct(stand_in).get(key) or b"0") == 0
        for key in records:
            assert await memcache.get(key) is None  # stale at home, orphaned elsewhere
            for server in trio:
                assert direct(server).get(key) is None

    run(main)


# -- counters on the cluster, end to end: tasks and threads through an outage ----------------


class TaskLoad:
    """Tasks incrementing and reading counters, tallying what was acknowledged."""

    def __init__(self, counters: list[AsyncCounter], tasks: int = 16) -> None:
        self.counters = counters
        self.tasks = tasks
        self.acknowledged = Tally[str]()
        self.errors: list[BaseException] = []
        self.reads = 0

    async def run(self, seconds: float, seed: int) -> None:
        until = time.monotonic() + seconds

        async def worker(rng: random.Random) -> None:
            while time.monotonic() < until:
                counter = rng.choice(self.counters)
                try:
                    await counter.increment(1)
                    self.acknowledged[counter.name] += 1
                    if rng.random() < 0.3:
                        await counter.get_count()
                        self.reads += 1
                except Exception as exc:
                    self.errors.append(exc)

        await asyncio.gather(*(worker(random.Random(seed * 100 + i)) for i in range(self.tasks)))


@pytest.mark.parametrize("outage", ["restart", "pause"])
def test_tasks_and_threads_stay_exact_while_a_server_dies_and_returns(
    sharded_counter_env: dict[str, str], trio: list[Memcached], outage: str
) -> None:
    hosts = [s.address for s in trio]
    names = [f"hot {i}" for i in range(12)]
    blocking = [Counter(n, memcached_hosts=hosts, memcache_timeout=TIMEOUT) for n in names]
    client = cluster_of(blocking[0])
    homes = Tally(client.server_for(c._record_key) for c in blocking)
    victim = by_address(trio, homes.most_common(1)[0][0])
    assert homes[victim.address] >= 2  # the outage hits counters cached there
    threads = Load(blocking, threads=4)

    async def main() -> tuple[TaskLoad, float]:
        counters = [AsyncCounter(n, memcached_hosts=hosts, memcache_timeout=TIMEOUT) for n in names]
        memcache = async_backend_for(counters[0]._ctx.backend, counters[0].settings).shell.memcache
        ring = memcache.router
        assert isinstance(ring, ServerRing)
        tasks = TaskLoad(counters)

        async def phase(seconds: float, seed: int) -> None:
            threads_running = asyncio.to_thread(threads.run, seconds)
            await asyncio.gather(tasks.run(seconds, seed), threads_running)

        await phase(1.5, 1)
        if outage == "restart":
            victim.kill()
        else:
            victim.pause()
        await phase(2.0, 2)
        await asyncio.to_thread(threads.pause)
        assert ring.server_states()[victim.address] == "down"
        assert client.server_states()[victim.address] == "down"
        if outage == "restart":
            victim.start()
        else:
            victim.resume()
        await phase(0.5, 3)
        rejoined_after = await all_up(memcache, ring)
        await asyncio.to_thread(wait_until_all_up, client)  # the blocking picture too
        await phase(1.5, 4)
        await asyncio.to_thread(threads.pause)
        for counter in counters:  # cached totals on the cluster, as the tasks see them
            truth = tasks.acknowledged[counter.name] + threads.acknowledged[counter.name]
            assert await counter.get_count(nocache=True) == truth, counter.name
            assert await counter.get_count() == truth, counter.name
        return tasks, rejoined_after

    try:
        tasks, rejoined_after = run(main)
    finally:
        threads.stop()
    assert tasks.errors == []
    assert threads.errors == []
    for counter in blocking:
        truth = tasks.acknowledged[counter.name] + threads.acknowledged[counter.name]
        assert counter.get_count(nocache=True) == truth, counter.name
        assert counter.count == truth, counter.name
    print(
        f"\naio cluster {outage}: tasks acknowledged={sum(tasks.acknowledged.values())} "
        f"threads acknowledged={sum(threads.acknowledged.values())} reads={tasks.reads} "
        f"counters_on_victim={homes[victim.address]}/12 rejoin_wait={rejoined_after:.2f}s"
    )
    assert sum(tasks.acknowledged.values()) > 100
    assert sum(threads.acknowledged.values()) > 100
    assert tasks.reads > 20
