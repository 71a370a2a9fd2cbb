"""CounterBuffer: timing, retries, shutdown, threads, fork and memory bounds on real backends."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from sharded_counter import Counter
from sharded_counter.core.validation import INT64_MAX
from sharded_counter.patterns.buffer import CounterBuffer
from sharded_counter_emulator import free_port

pytestmark = pytest.mark.backends

FAST_FAIL = {"retry_attempts": 1, "retry_deadline": 0.5, "rpc_timeout": 0.3}


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_flushes_once_per_interval_after_the_first_increment(
    sharded_counter_env: dict[str, str],
) -> None:
    buffer = CounterBuffer(interval=0.5, jitter=0.2)
    started = time.monotonic()
    for _ in range(1000):
        buffer.increment("hits")
    buffer.increment("hits", -10)
    assert buffer.pending("hits") == 990
    assert Counter("hits").get_count(nocache=True) == 0  # nothing written yet
    assert wait_for(lambda: buffer.pending("hits") == 0)
    flushed_after = time.monotonic() - started
    assert 0.5 <= flushed_after < 3.0
    assert Counter("hits").get_count(nocache=True) == 990
    # A thousand increments, one shard write.
    assert Counter("hits").verify().shards == 990


def test_count_includes_what_is_pending(sharded_counter_env: dict[str, str]) -> None:
    buffer = CounterBuffer(interval=3600)
    Counter("mixed").increment(5)
    buffer.increment("mixed", 3)
    assert buffer.count("mixed") == 8
    buffer.flush("mixed")
    assert buffer.pending("mixed") == 0
    assert buffer.count("mixed") == 8
    assert Counter("mixed").count == 8


def test_many_threads_add_up_exactly(sharded_counter_env: dict[str, str]) -> None:
    buffer = CounterBuffer(interval=0.05)  # flushes race the writers
    threads, per_thread = 16, 2000

    def work(index: int) -> None:
        for i in range(per_thread):
            if i % 2:
                buffer.increment("busy", index + 1)
            else:
                buffer.async_increment("busy", index + 1)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    buffer.flush()
    expected = per_thread * sum(range(1, threads + 1))
    assert Counter("busy").get_count(nocache=True) == expected
    assert Counter("busy").count == expected


@pytest.mark.needs_processes
def test_failed_flushes_back_off_then_stash(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    live = Counter("flaky")
    with monkeypatch.context() as patch:
        patch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        buffer = CounterBuffer(interval=0.1, backoff=0.2, max_attempts=3, **FAST_FAIL)
        with caplog.at_level(logging.WARNING, logger="sharded_counter"):
            buffer.increment("flaky", 7)
            # Two failed attempts under the batch's key, then the third stashes it.
            assert wait_for(lambda: buffer.pending("flaky") == 0 and not buffer._failed)
        failures = [r for r in caplog.records if "flush of 'flaky'" in r.getMessage()]
        assert len(failures) == 2
    assert live.count == 7  # the stash counts
    live.increment(1)  # and the next healthy write folds it into a shard
    assert live.verify().shards == 8


@pytest.mark.needs_processes
def test_flush_on_demand_raises_and_keeps_the_amount(
    sharded_counter_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    buffer = CounterBuffer(
        interval=3600,
        memcached_hosts=[f"127.0.0.1:{free_port()}"],
        memcache_timeout=0.2,
        **FAST_FAIL,
    )
    buffer.increment("stuck", 4)
    with pytest.raises(Exception, match="not recorded"):
        buffer.flush()
    assert buffer.pending("stuck") == 4  # nothing dropped


def test_thread_stops_when_idle_and_restarts(sharded_counter_env: dict[str, str]) -> None:
    buffer = CounterBuffer(interval=0.05, timeout=0.3)
    buffer.increment("sleepy")
    assert wait_for(lambda: buffer._thread is None)
    assert Counter("sleepy").count == 1
    buffer.increment("sleepy", 2)
    assert buffer._thread is not None
    assert wait_for(lambda: Counter("sleepy").count == 3)


def test_memory_is_bounded_by_flushing_early(sharded_counter_env: dict[str, str]) -> None:
    buffer = CounterBuffer(interval=3600, max_keys=5)
    for i in range(6):
        buffer.increment(f"k{i}")
    assert wait_for(lambda: all(buffer.pending(f"k{i}") == 0 for i in range(6)))
    assert Counter.get_counts([f"k{i}" for i in range(6)]) == {f"k{i}": 1 for i in range(6)}


def test_pending_sums_beyond_int64_are_written_in_parts(
    sharded_counter_env: dict[str, str],
) -> None:
    buffer = CounterBuffer(interval=3600, write_mode="transaction")
    for _ in range(3):
        buffer.increment("huge", INT64_MAX)
    assert buffer.pending("huge") == 3 * INT64_MAX
    buffer.flush("huge")
    assert Counter("huge").get_count(nocache=True) == 3 * INT64_MAX


@pytest.mark.needs_processes
def test_pending_increments_are_written_at_exit(sharded_counter_env: dict[str, str]) -> None:
    script = textwrap.dedent(
        """
        from sharded_counter.patterns.buffer import CounterBuffer
        buffer = CounterBuffer(interval=3600)
        for _ in range(50):
            buffer.increment("at-exit")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=dict(os.environ), timeout=60)
    assert Counter("at-exit").get_count(nocache=True) == 50


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.needs_processes
def test_a_forked_child_does_not_write_its_parents_pending(
    sharded_counter_env: dict[str, str],
) -> None:
    buffer = CounterBuffer(interval=3600)
    buffer.increment("forked", 10)
    pid = os.fork()
    if pid == 0:  # the child: writes only its own increment, then exits without atexit
        code = 0
        try:
            buffer.increment("forked", 1)
            buffer.flush()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    buffer.flush()
    assert Counter("forked").get_count(nocache=True) == 11


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"interval": 0}, ValueError),
        ({"jitter": -1}, ValueError),
        ({"backoff": "1"}, TypeError),
        ({"max_attempts": 0}, ValueError),
        ({"max_keys": 1.5}, TypeError),
        ({"shards": 0}, ValueError),
        ({"counter_class": dict}, TypeError),
    ],
)
def test_bad_settings_are_refused(options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        CounterBuffer(**options)


@pytest.mark.parametrize(("name", "n"), [("ok", 1.5), ("ok", True), ("", 1), (None, 1)])
def test_bad_increments_raise_in_the_caller(name: Any, n: Any) -> None:
    buffer = CounterBuffer(interval=3600, memcached_hosts=())
    with pytest.raises((TypeError, ValueError)):
        buffer.increment(name, n)
    with pytest.raises((TypeError, ValueError)):
        buffer.async_increment(name, n)
    assert buffer._pending == {}
