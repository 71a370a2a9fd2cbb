"""lock(): mutual exclusion, expiry and safe release, on a real memcached.

The mutual-exclusion test runs 16 threads in 2 spawned processes around a
read-modify-write of one memcache key that is not atomic by itself; a control
run without the lock shows that the same workload does lose updates.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
import uuid

import pytest
from cachekit import raw_client
from click.testing import CliRunner

from sharded_counter import CacheUnavailable, Locked, lock, who_holds
from sharded_counter.patterns.lock import Lease
from sharded_counter.tools.cli import main
from sharded_counter_emulator import Memcached, RedisServer, free_port


@pytest.fixture
def url(sharded_counter_cache: Memcached | RedisServer) -> str:
    return sharded_counter_cache.url


def fresh_name() -> str:
    return f"crazy {uuid.uuid4()}"


# -- taking and giving back --------------------------------------------------------------------


def test_nowait_raises_locked_naming_the_holder(url: str) -> None:
    name = fresh_name()
    with lock(name, ttl=10, cache_url=url) as held:
        assert isinstance(held, Lease)
        assert held.expires_at is not None
        with pytest.raises(Locked) as refused, lock(name, cache_url=url):
            pytest.fail("the lock was taken twice")
        assert refused.value.name == name
        assert refused.value.holder is not None
        assert threading.current_thread().name in refused.value.holder.owner
        assert 9 <= refused.value.holder.ttl() <= 10
        assert refused.value.waited is None
    # Released: taken again at once (over its tombstone).
    with lock(name, cache_url=url):
        pass


def test_who_holds_shows_the_holder_and_its_ttl(url: str) -> None:
    name = fresh_name()
    assert who_holds(name, cache_url=url) is None
    with lock(name, ttl=30, cache_url=url):
        holder = who_holds(name, cache_url=url)
        assert holder is not None
        assert 29 <= holder.ttl() <= 30
        assert holder.acquired_at <= time.time()
    assert who_holds(name, cache_url=url) is None  # a tombstone reads as free


def test_a_lock_lapses_after_its_ttl(url: str) -> None:
    # memcached's clock ticks once a second, so a lock taken with ttl=N lapses
    # between N-1 and N seconds later: ttl=1 could lapse before the next look.
    # The sleep leaves a second past the latest lapse, for a clock tick that runs late.
    name = fresh_name()
    first = lock(name, ttl=2, cache_url=url).acquire()
    with pytest.raises(Locked):
        lock(name, cache_url=url).acquire()
    time.sleep(3.1)
    second = lock(name, ttl=10, cache_url=url).acquire()
    assert second.release() is True
    assert first.release() is False


def test_a_stale_holder_cannot_release_the_next_holders_lock(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = fresh_name()
    stale = lock(name, ttl=1, cache_url=url).acquire()
    time.sleep(2.1)
    current = lock(name, ttl=10, cache_url=url).acquire()
    with caplog.at_level(logging.WARNING, logger="sharded_counter"):
        assert stale.release() is False
    assert "lapsed before it was released" in caplog.text
    # Still held by the current holder: nobody else gets in.
    with pytest.raises(Locked):
        lock(name, cache_url=url).acquire()
    assert current.release() is True
    assert lock(name, cache_url=url).acquire().release() is True


def test_extend_keeps_a_lease_alive(url: str) -> None:
    # A lease of ttl=3 lapses between 2 and 3 seconds after it was written (memcached's
    # clock ticks once a second), so extending every second leaves a second to spare;
    # four rounds outlast the 3 seconds the first lease could have lived unextended.
    name = fresh_name()
    taken = time.monotonic()
    held = lock(name, ttl=3, cache_url=url).acquire()
    for _ in range(4):
        time.sleep(1)
        assert held.extend(3) is True
    assert time.monotonic() - taken > 3
    with pytest.raises(Locked):
        lock(name, cache_url=url).acquire()
    assert held.release() is True
    assert held.extend() is False  # not ours any more


# -- waiting --------------------------------------------------------------------------------------


def test_a_blocking_wait_gets_the_lock_once_it_is_released(url: str) -> None:
    name = fresh_name()
    holder = lock(name, ttl=10, cache_url=url).acquire()
    releaser = threading.Timer(0.4, holder.release)
    releaser.start()
    started = time.monotonic()
    with lock(name, ttl=10, nowait=False, timeout=5, cache_url=url):
        waited = time.monotonic() - started
    releaser.join()
    assert 0.35 <= waited < 1.5  # backoff is capped, so it notices soon after


def test_a_blocking_wait_gives_up_after_its_timeout(url: str) -> None:
    name = fresh_name()
    with lock(name, ttl=10, cache_url=url):
        started = time.monotonic()
        with pytest.raises(Locked) as refused:
            lock(name, nowait=False, timeout=0.5, cache_url=url).acquire()
        elapsed = time.monotonic() - started
    assert refused.value.waited is not None and refused.value.waited >= 0.5
    assert 0.5 <= elapsed < 1.0
    assert "after waiting" in str(refused.value)


def test_the_arguments_are_checked(url: str) -> None:
    with pytest.raises(TypeError, match="whole seconds"):
        lock("x", ttl=1.5, cache_url=url)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        lock("x", ttl=0, cache_url=url)
    with pytest.raises(ValueError, match="timeout"):
        lock("x", nowait=False, timeout=-1, cache_url=url)
    with pytest.raises(TypeError):
        lock(b"x", cache_url=url)  # type: ignore[arg-type]


def test_memcache_down_refuses_the_lock_but_a_release_never_raises(
    sharded_counter_cache: Memcached | RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(CacheUnavailable, match="cannot take lock"):
        lock("x", memcached_hosts=[f"127.0.0.1:{free_port()}"]).acquire()
    server = Memcached(port=free_port()).start()
    held = lock(fresh_name(), cache_url=server.url).acquire()
    server.stop()
    with caplog.at_level(logging.WARNING, logger="sharded_counter"):
        assert held.release() is False
    assert "not released" in caplog.text


# -- mutual exclusion: 16 threads in 2 processes ---------------------------------------------------


def bump_process(
    url: str,
    name: str,
    counter_key: str,
    threads: int,
    rounds: int,
    locked: bool,
) -> None:
    raw = raw_client(url)
    raw_lock = threading.Lock()  # pymemcache's base Client is not thread-safe

    def bump() -> None:
        # Read, pause, write: loses updates unless the lock keeps bumps apart.
        with raw_lock:
            value = int(raw.get(counter_key) or b"0")
        time.sleep(0.0005)
        with raw_lock:
            raw.set(counter_key, str(value + 1).encode())

    def work() -> None:
        for _ in range(rounds):
            if locked:
                with lock(name, ttl=10, nowait=False, timeout=60, cache_url=url):
                    bump()
            else:
                bump()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def run_bumpers(sharded_counter_cache: Memcached | RedisServer, locked: bool) -> int:
    name, counter_key = fresh_name(), f"shared:{uuid.uuid4().hex}"
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=bump_process,
            args=(sharded_counter_cache.url, name, counter_key, 8, 25, locked),
        )
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    raw = raw_client(sharded_counter_cache)
    try:
        return int(raw.get(counter_key) or b"0")
    finally:
        raw.close()


def test_16_threads_in_2_processes_never_hold_it_together(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    final = run_bumpers(sharded_counter_cache, locked=True)
    print(f"\nlock: {final} of {2 * 8 * 25} bumps kept with the lock")
    assert final == 2 * 8 * 25


def test_the_same_work_without_the_lock_loses_updates(
    sharded_counter_cache: Memcached | RedisServer,
) -> None:
    """The control: the exact count above is the lock's doing, not the workload's."""
    final = run_bumpers(sharded_counter_cache, locked=False)
    print(f"\nlock control: {final} of {2 * 8 * 25} bumps kept without the lock")
    assert final < 2 * 8 * 25


# -- the command line ---------------------------------------------------------------------------


def test_lock_status_shows_free_and_held_locks(
    sharded_counter_cache: Memcached | RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDED_COUNTER_CACHE_URL", sharded_counter_cache.url)
    monkeypatch.setenv("COLUMNS", "250")
    free, held = fresh_name(), fresh_name()
    with lock(held, ttl=20):
        result = CliRunner().invoke(main, ["lock-status", free, held])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    assert "free" in rows[free]
    assert "held" in rows[held] and threading.current_thread().name in rows[held]
    assert any(f"{s:.1f} s" in rows[held] for s in (20.0, 19.9, 19.8, 19.7, 19.6))


@pytest.mark.memcached_only  # counts memcached's own connections or reads MEMCACHED_HOSTS
def test_lock_status_reports_memcache_down_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMCACHED_HOSTS", f"127.0.0.1:{free_port()}")
    result = CliRunner().invoke(main, ["lock-status", "x"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "error:" in result.output
